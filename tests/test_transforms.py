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


# --------------------------------------------------------------------------- ToImageGridd, pad_offsets
def _padded(shape, target, seed):
    """An image of ``shape`` padded like configs/inference.json (SpatialPadd to ``target``, then
    DivisiblePadd to a multiple of 16), with an affine whose origin is not zero."""
    from monai.transforms import Compose, DivisiblePadd, SpatialPadd

    affine = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    img = MetaTensor(
        torch.as_tensor(smooth_volume(shape, seed=seed))[None], affine=affine, meta={"filename_or_obj": f"img{seed}"}
    )
    pad = Compose([SpatialPadd("image", target), DivisiblePadd("image", 16)])
    return pad({"image": img})["image"], affine


def test_pad_offsets_read_monai_pad_records():
    from scripts.transforms import pad_offsets

    padded, _ = _padded((35, 51, 70), (64, 64, 64), seed=0)
    assert tuple(padded.shape[1:]) == (64, 64, 80)
    offset, shape = pad_offsets(padded)
    assert shape == (35, 51, 70)
    assert offset.tolist() == [14, 6, 5]  # SpatialPad centres (29 -> 14 before), DivisiblePad 70 -> 80: 5 before
    assert torch.equal(padded[0, 14:49, 6:57, 5:75], torch.as_tensor(smooth_volume((35, 51, 70), seed=0)))
    offset, shape = pad_offsets(MetaTensor(torch.zeros(1, 4, 5, 6)))
    assert offset.tolist() == [0, 0, 0] and shape == (4, 5, 6)  # no record: not padded


def test_to_image_grid_crops_back_and_re_expresses_fields_in_the_other_images_voxels():
    """A pair of different sizes padded to one grid: an output field u on the padded grid, brought back
    with ToImageGridd, must sample the moving image's OWN array at the same physical voxel: for a
    fixed voxel x, x + u_raw(x) = (x + off_f + u_pad(x + off_f)) - off_m."""
    from scripts.transforms import ToImageGridd

    fixed, f_affine = _padded((35, 51, 40), (64, 64, 64), seed=1)
    moving, _ = _padded((41, 47, 30), (64, 64, 64), seed=2)
    assert fixed.shape == moving.shape
    u_pad = torch.randn(3, *fixed.shape[1:])
    warped = torch.randn(1, *fixed.shape[1:])
    out = ToImageGridd(images=["warped_image"], fields=["ddf"])(
        {
            "ddf": u_pad,
            "warped_image": warped,
            "fixed_image": fixed,
            "moving_image": moving,
            "fixed_id": "0001",
            "moving_id": "0002",
        }
    )
    off_f, off_m = torch.tensor([14, 6, 12]), torch.tensor([11, 8, 17])
    u_raw, w_raw = out["ddf"], out["warped_image"]
    assert tuple(u_raw.shape) == (3, 35, 51, 40) and tuple(w_raw.shape) == (1, 35, 51, 40)
    x = torch.tensor([3, 7, 5])
    expected = x + off_f + u_pad[:, 17, 13, 17] - off_m  # the padded field at x + off_f
    assert torch.allclose(x + u_raw[:, 3, 7, 5].as_tensor(), expected, atol=1e-5)
    assert torch.equal(w_raw[0], warped[0, 14:49, 6:57, 12:52])
    # the fixed image's own affine and header, the ids and key the output names are made from
    assert torch.allclose(u_raw.affine, f_affine) and torch.allclose(w_raw.affine, f_affine)
    assert u_raw.meta["key"] == "ddf" and u_raw.meta["fixed_id"] == "0001" and u_raw.meta["moving_id"] == "0002"
    assert not u_raw.applied_operations


def test_to_image_grid_leaves_unpadded_pairs_and_missing_keys_alone():
    from scripts.transforms import ToImageGridd

    fixed = MetaTensor(torch.rand(1, 16, 16, 16))
    u = torch.randn(3, 16, 16, 16)
    out = ToImageGridd(fields=["ddf", "ddf_fixed_to_moving"])(
        {"ddf": u, "fixed_image": fixed, "moving_image": fixed.clone()}
    )
    assert torch.equal(out["ddf"].as_tensor(), u) and "ddf_fixed_to_moving" not in out


def test_to_image_grid_refuses_what_cropping_cannot_undo():
    from monai.transforms import Spacingd

    from scripts.transforms import ToImageGridd

    img = MetaTensor(torch.rand(1, 8, 8, 8), meta={"filename_or_obj": "resampled.nii.gz"})
    resampled = Spacingd("image", pixdim=(2.0, 2.0, 2.0))({"image": img})["image"]
    with pytest.raises(ValueError, match="resampled.nii.gz: SpatialResample cannot be undone by cropping"):
        ToImageGridd(fields=["ddf"])(
            {"ddf": torch.zeros(3, 4, 4, 4), "fixed_image": resampled, "moving_image": resampled}
        )
