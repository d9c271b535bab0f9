"""Tests of scripts/transforms.py: CheckImageLabeld refuses unusable inputs with a message naming
the file, and lets good pairs through unchanged."""

import numpy as np
import pytest
import torch
from conftest import smooth_volume
from monai.data import MetaTensor

from scripts.transforms import CheckImageLabeld

IMG = "/data/imagesTr/Hippo_0007_0000.nii.gz"
LAB = "/data/labelsTr/Hippo_0007_0000.nii.gz"


def image(array=None, name=IMG):
    if array is None:
        array = smooth_volume((8, 9, 10))[None]
    return MetaTensor(torch.as_tensor(np.asarray(array), dtype=torch.float32), meta={"filename_or_obj": name})


def label(array=None, name=LAB):
    if array is None:
        array = np.random.default_rng(0).integers(0, 3, size=(1, 8, 9, 10))
    return MetaTensor(torch.as_tensor(np.asarray(array)), meta={"filename_or_obj": name})


def test_accepts_a_good_pair_unchanged():
    check = CheckImageLabeld(num_labels=3)
    data = {"image": image(), "label": label(), "id": "0007"}
    out = check(data)
    assert out["image"] is data["image"] and out["label"] is data["label"] and out["id"] == "0007"
    # float label maps holding integer values (what LoadImaged gives) are fine too
    check({"image": image(), "label": label().float()})
    # the label is optional (unlabelled pretraining data)
    check({"image": image()})
    # multi-channel images (CT windows)
    check_ct = CheckImageLabeld(num_labels=14, in_channels=3)
    check_ct({"image": image(np.stack([smooth_volume((8, 9, 10), seed=s) for s in range(3)]))})
    # plain arrays without metadata also work
    check({"image": smooth_volume((8, 9, 10))[None], "label": np.zeros((1, 8, 9, 10))})


@pytest.mark.parametrize(
    "array, message",
    [
        (smooth_volume((8, 9, 10))[None, :, :, 0], "3-D image"),  # 2-D image (1, H, W)
        (smooth_volume((8, 9, 10))[None, ..., None], "3-D image"),  # 4-D image (1, H, W, D, T)
        (np.stack([smooth_volume((8, 9, 10))] * 2), r"1 channel.*\(2, 8, 9, 10\)"),  # 4-D as (T, H, W, D)
    ],
)
def test_refuses_wrong_dimensions(array, message):
    with pytest.raises(ValueError, match=message) as err:
        CheckImageLabeld(num_labels=3)({"image": image(array)})
    assert IMG in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_non_finite_voxels(bad):
    array = smooth_volume((8, 9, 10))[None]
    array[0, 3, 4, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite") as err:
        CheckImageLabeld(num_labels=3)({"image": image(array)})
    assert IMG in str(err.value)


def test_refuses_a_constant_image():
    with pytest.raises(ValueError, match="constant") as err:
        CheckImageLabeld(num_labels=3)({"image": image(np.full((1, 8, 9, 10), 7.0))})
    assert IMG in str(err.value)


def test_refuses_a_label_map_of_another_shape():
    with pytest.raises(ValueError, match=r"\(8, 9, 11\).*\(8, 9, 10\)") as err:
        CheckImageLabeld(num_labels=3)({"image": image(), "label": label(np.zeros((1, 8, 9, 11)))})
    assert LAB in str(err.value) and IMG in str(err.value)


def test_refuses_non_integer_labels():
    lab = np.zeros((1, 8, 9, 10), np.float32)
    lab[0, 1, 1, 1] = 0.5
    with pytest.raises(ValueError, match="non-integer") as err:
        CheckImageLabeld(num_labels=3)({"image": image(), "label": label(lab)})
    assert LAB in str(err.value)


@pytest.mark.parametrize("value", [3, 7, -1])
def test_refuses_labels_out_of_range(value):
    lab = np.zeros((1, 8, 9, 10), np.int64)
    lab[0, 2, 2, 2] = value
    with pytest.raises(ValueError, match=rf"\[{value}\].*0\.\.2") as err:
        CheckImageLabeld(num_labels=3)({"image": image(), "label": label(lab)})
    assert LAB in str(err.value)
