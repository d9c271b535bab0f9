"""Tests of scripts/data.py: random and listed pairs, identical augmentation of both images, the
up-front check of a pair list; configs/train.json's augmentation as parsed (elastic and intensity per image)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import smooth_volume
from monai.data import DataLoader, MetaTensor
from monai.transforms import Compose, RandAffined, RandFlipd

from scripts.data import PairDataset, RandomPairDataset, check_dataset

ROOT = Path(__file__).resolve().parents[1]
PAIR_KEYS = ["moving_image", "fixed_image", "moving_label", "fixed_label"]


def id_cases(n, shape=(2, 2, 2)):
    """Case i: image filled with i, label filled with 10 + i, so pairs can be read back."""
    return [
        {"image": np.full((1, *shape), float(i), np.float32), "label": np.full((1, *shape), 10 + i), "extra": i}
        for i in range(n)
    ]


def ids(pair):
    return int(pair["moving_image"].flat[0]), int(pair["fixed_image"].flat[0])


# --------------------------------------------------------------------------- RandomPairDataset
def test_random_pairs_never_self_and_moving_is_the_index():
    n = 5
    ds = RandomPairDataset(id_cases(n)).set_random_state(seed=0)
    assert len(ds) == n
    fixed_seen = {i: set() for i in range(n)}
    for _epoch in range(40):
        movings = []
        for i in range(n):
            pair = ds[i]
            m, f = ids(pair)
            assert m == i and f != i
            assert int(pair["moving_label"].flat[0]) == 10 + m and int(pair["fixed_label"].flat[0]) == 10 + f
            assert "moving_extra" not in pair  # only the requested keys are carried
            movings.append(m)
            fixed_seen[i].add(f)
        assert sorted(movings) == list(range(n))  # each case is the moving image exactly once per pass
    # every other case gets drawn as the fixed image
    assert all(fixed_seen[i] == set(range(n)) - {i} for i in range(n))


def test_identity_prob_pairs_a_case_with_itself_that_often():
    n, p = 5, 0.3
    ds = RandomPairDataset(id_cases(n), identity_prob=p).set_random_state(seed=0)
    draws = [ids(ds[i % n]) for i in range(2000)]
    assert all(m == i % n for i, (m, _) in enumerate(draws))
    share = np.mean([m == f for m, f in draws])
    assert abs(share - p) < 0.04, share  # 2000 draws: standard error 0.01
    pair = next(ds[i] for i in range(n) for _ in range(20) if ids(ds[i])[0] == ids(ds[i])[1])
    assert int(pair["moving_label"].flat[0]) == int(pair["fixed_label"].flat[0])  # its own label too
    # the other pairs are still spread over every other case; 1 pairs every case with itself
    assert {f for m, f in draws if m == 0} == set(range(n))
    always = RandomPairDataset(id_cases(n), identity_prob=1.0).set_random_state(seed=0)
    assert all(ids(always[i]) == (i, i) for i in range(n))
    # 0 (the default) draws exactly the pairs it drew before the option existed
    plain = RandomPairDataset(id_cases(n)).set_random_state(seed=2)
    zero = RandomPairDataset(id_cases(n), identity_prob=0.0).set_random_state(seed=2)
    assert [ids(plain[i % n]) for i in range(50)] == [ids(zero[i % n]) for i in range(50)]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="identity_prob must be a probability"):
            RandomPairDataset(id_cases(n), identity_prob=bad)


def test_two_cases_always_pair_with_each_other():
    ds = RandomPairDataset(id_cases(2)).set_random_state(seed=1)
    assert [ids(ds[i]) for i in (0, 1, 0, 1)] == [(0, 1), (1, 0), (0, 1), (1, 0)]
    with pytest.raises(ValueError, match="at least 2"):
        RandomPairDataset(id_cases(1))


def test_fixed_choice_is_random_and_reproducible():
    def draws(seed):
        ds = RandomPairDataset(id_cases(6)).set_random_state(seed=seed)
        return [ids(ds[i % 6])[1] for i in range(60)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_a_pair_on_two_grids_is_refused_naming_both_files():
    """Cases padded to a canvas smaller than some images keep different shapes; the pair that meets
    them is refused with both files and the option to change, not a collate or concatenation error."""
    cases = [
        {"image": MetaTensor(np.zeros((1, *shape), np.float32), meta={"filename_or_obj": f"case{i}.nii.gz"})}
        for i, shape in enumerate([(32, 64, 48), (48, 64, 48)])
    ]
    ds = RandomPairDataset(cases).set_random_state(seed=0)
    with pytest.raises(
        ValueError, match=r"case0\.nii\.gz.*\(32, 64, 48\).*case1\.nii\.gz.*\(48, 64, 48\).*spatial_size"
    ):
        ds[0]


def test_missing_label_keys_are_skipped():
    cases = [{"image": np.full((1, 2, 2, 2), float(i), np.float32)} for i in range(3)]
    pair = RandomPairDataset(cases).set_random_state(seed=0)[1]
    assert set(pair) == {"moving_image", "fixed_image"}


def _augmentation():
    return Compose(
        [
            RandFlipd(keys=PAIR_KEYS, prob=0.5, spatial_axis=0),
            RandAffined(
                keys=PAIR_KEYS,
                prob=1.0,
                rotate_range=(0.3, 0.3, 0.3),
                translate_range=(2, 2, 2),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "bilinear", "nearest", "nearest"),
                padding_mode=("border", "border", "zeros", "zeros"),
            ),
        ]
    )


def test_augmentation_is_identical_for_moving_and_fixed():
    shape = (12, 12, 12)
    image = smooth_volume(shape, seed=0)[None]
    label = (image > 0.5).astype(np.int64)
    same = [{"image": image.copy(), "label": label.copy()} for _ in range(2)]  # two cases, same arrays
    ds = RandomPairDataset(same, transform=_augmentation()).set_random_state(seed=0)
    outs = [ds[i % 2] for i in range(6)]
    for out in outs:
        np.testing.assert_array_equal(np.asarray(out["moving_image"]), np.asarray(out["fixed_image"]))
        np.testing.assert_array_equal(np.asarray(out["moving_label"]), np.asarray(out["fixed_label"]))
        assert not np.allclose(np.asarray(out["moving_image"]), image, atol=1e-3)  # it did augment
    # and draws differ between items (a fresh random transform each time)
    assert not np.allclose(np.asarray(outs[0]["moving_image"]), np.asarray(outs[1]["moving_image"]))
    # set_random_state reseeds the augmentation too: same seed, same outputs
    again = RandomPairDataset(same, transform=_augmentation()).set_random_state(seed=0)
    np.testing.assert_allclose(np.asarray(again[0]["moving_image"]), np.asarray(outs[0]["moving_image"]))


def _train_augmentation(**overrides):
    """configs/train.json's augmentation, as the bundle parses it, with overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update(overrides)
    return parser.get_parsed_content("augmentation", instantiate=True)


def _same_pair(shape=(24, 28, 24)):
    image = smooth_volume(shape, seed=1)[None]
    label = (image > 0.55).astype(np.float32) + (image > 0.75)  # labels 0, 1, 2
    return [{"image": image.copy(), "label": label.copy()} for _ in range(2)], image, label


def test_train_config_identity_prob_reaches_the_pair_dataset():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    cases = "$[{'image': torch.full((1, 2, 2, 2), float(i))} for i in range(3)]"
    parser.update({"train#dataset#cases": cases, "train#dataset#transform": None})
    assert parser.get_parsed_content("train#dataset").identity_prob == 0.0  # off by default
    parser.update({"identity_prob": 1.0})
    ds = parser.get_parsed_content("train#dataset")
    assert [int(ds[i]["fixed_image"].flatten()[0]) for i in range(3)] == [0, 1, 2]


def test_train_config_augments_both_images_alike_by_default():
    cases, image, _ = _same_pair()
    ds = RandomPairDataset(cases, transform=_train_augmentation(aug_prob=1.0)).set_random_state(seed=0)
    out = ds[0]
    np.testing.assert_array_equal(np.asarray(out["moving_image"]), np.asarray(out["fixed_image"]))
    np.testing.assert_array_equal(np.asarray(out["moving_label"]), np.asarray(out["fixed_label"]))
    assert not np.allclose(np.asarray(out["moving_image"]), image, atol=1e-3)


def test_elastic_prob_deforms_each_image_on_its_own():
    """--elastic_prob: a separate random elastic deformation per image (new shapes, not only new poses);
    the label follows its image (nearest neighbour, the same label values) and the grid is kept."""
    cases, image, label = _same_pair()
    aug = _train_augmentation(aug_prob=0.0, elastic_prob=1.0, elastic_magnitude=[150.0, 150.0])
    ds = RandomPairDataset(cases, transform=aug).set_random_state(seed=0)
    for i in range(2):
        out = ds[i]
        moving, fixed = np.asarray(out["moving_image"]), np.asarray(out["fixed_image"])
        assert moving.shape == fixed.shape == image.shape
        assert np.abs(moving - fixed).mean() > 0.01  # the two draws differ
        for key, img in (("moving", moving), ("fixed", fixed)):
            lab = np.asarray(out[f"{key}_label"])
            assert set(np.unique(lab)) <= {0.0, 1.0, 2.0}
            assert 0 < (lab != label).mean() < 0.2  # deformed, not scrambled
            # the warped label still marks the bright warped voxels: the label follows its own image
            assert img[lab == 2].mean() > img[lab == 1].mean() > img[lab == 0].mean()


def test_intensity_prob_changes_each_image_on_its_own_and_only_its_intensities():
    """--intensity_prob: a random MRI bias field and gamma drawn for each image of a pair on its own; the
    labels and the grid are kept, voxels at 0 stay 0, and the images stay in [0, 1]."""
    cases, image, label = _same_pair()
    image[..., :3] = 0.0  # a slab at 0, the darkest value after the min-max
    for case in cases:
        case["image"] = image.copy()
    ds = RandomPairDataset(cases, transform=_train_augmentation(aug_prob=0.0, intensity_prob=1.0))
    ds.set_random_state(seed=0)
    for i in range(2):
        out = ds[i]
        moving, fixed = np.asarray(out["moving_image"]), np.asarray(out["fixed_image"])
        assert moving.shape == fixed.shape == image.shape
        assert np.abs(moving - fixed).mean() > 0.005  # two draws
        for img in (moving, fixed):
            assert np.abs(img - image).mean() > 0.005
            assert img.min() >= 0.0 and img.max() <= 1.0 + 1e-6
            assert np.abs(img[..., :3]).max() < 1e-6  # multiplied by the field, 0 stays 0
            assert np.corrcoef(img.ravel(), image.ravel())[0, 1] > 0.8  # the same anatomy, another contrast
        for key in ("moving_label", "fixed_label"):
            np.testing.assert_array_equal(np.asarray(out[key]), label)


def test_intensity_prob_0_draws_what_the_augmentation_drew_without_it():
    """Off by default, and then the runs made before the key existed draw the same augmentations: its
    transforms come last in the Compose, whose seeds are handed out in order (the final clip to [0, 1]
    can only move a value that interpolation rounded a float32 step over 1)."""
    assert json.loads((ROOT / "configs" / "train.json").read_text())["intensity_prob"] == 0.0
    cases, _, _ = _same_pair()
    full = _train_augmentation(aug_prob=1.0, elastic_prob=0.5)
    before = _train_augmentation(aug_prob=1.0, elastic_prob=0.5)
    names = [type(t).__name__ for t in before.transforms]
    assert names[-5:] == [
        "RandBiasFieldd",
        "RandBiasFieldd",
        "RandAdjustContrastd",
        "RandAdjustContrastd",
        "ScaleIntensityRanged",
    ]
    before.transforms = before.transforms[:-5]
    outs = [RandomPairDataset(cases, transform=t).set_random_state(seed=3) for t in (full, before)]
    for i in range(2):
        a, b = outs[0][i], outs[1][i]
        for key in ("moving_image", "fixed_image", "moving_label", "fixed_label"):
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=0, atol=1e-6)


def test_random_pairs_collate_in_a_dataloader():
    ds = RandomPairDataset(id_cases(4, shape=(4, 4, 4))).set_random_state(seed=0)
    batches = list(DataLoader(ds, batch_size=2, num_workers=0))
    assert len(batches) == 2
    assert batches[0]["moving_image"].shape == (2, 1, 4, 4, 4)


# --------------------------------------------------------------------------- PairDataset
def test_pair_dataset_transforms_both_and_passes_ids():
    calls = []

    def per_case(case):
        calls.append(sorted(case))
        out = dict(case)
        out["image"] = case["image"] * 2 + 1
        if "label" in case:
            out["label"] = case["label"] + 100
        return out

    pairs = [
        {
            "moving_image": np.full((1, 2, 2, 2), 1.0),
            "fixed_image": np.full((1, 2, 2, 2), 3.0),
            "moving_label": np.full((1, 2, 2, 2), 1),
            "fixed_label": np.full((1, 2, 2, 2), 2),
            "moving_id": "0007",
            "fixed_id": "0003",
        },
        {"moving_image": np.zeros((1, 2, 2, 2)), "fixed_image": np.ones((1, 2, 2, 2)), "pair": 1},
    ]
    ds = PairDataset(pairs, transform=per_case)
    assert len(ds) == 2
    out = ds[0]
    assert calls == [["image", "label"], ["image", "label"]]
    assert out["moving_image"].flat[0] == 3.0 and out["fixed_image"].flat[0] == 7.0
    assert out["moving_label"].flat[0] == 101 and out["fixed_label"].flat[0] == 102
    assert out["moving_id"] == "0007" and out["fixed_id"] == "0003"
    assert set(out) == set(pairs[0])
    assert pairs[0]["moving_image"].flat[0] == 1.0 and "moving_label" in pairs[0]  # input untouched
    out = ds[1]
    assert set(out) == {"moving_image", "fixed_image", "pair"} and out["pair"] == 1
    assert out["fixed_image"].flat[0] == 3.0


def test_pair_dataset_errors_name_role_and_file():
    def loader(case):
        if "broken" in str(case["image"]):
            raise RuntimeError("applying transform") from OSError("Compressed file ended before the end-of-stream")
        return case

    pairs = [
        {"moving_image": "/d/imagesTr/a.nii.gz", "fixed_image": "/d/imagesTr/b.nii.gz"},
        {"moving_image": "/d/imagesTr/a.nii.gz", "fixed_image": "/d/imagesTr/broken.nii.gz"},
    ]
    ds = PairDataset(pairs, transform=loader)
    assert ds[0]["fixed_image"] == "/d/imagesTr/b.nii.gz"
    with pytest.raises(ValueError, match=r"fixed /d/imagesTr/broken\.nii\.gz: Compressed file ended"):
        ds[1]


def _shape_loader(calls):
    """A stand-in for the preprocessing: the image 'name_HxWxD' becomes an array of that shape."""

    def load(case):
        calls.append(case["image"])
        if "broken" in case["image"]:
            raise RuntimeError("applying transform") from OSError("Compressed file ended before the end-of-stream")
        shape = tuple(int(n) for n in case["image"].rsplit("_", 1)[1].split("x"))
        return {"image": np.zeros((1, *shape), np.float32)}

    return load


def test_check_dataset_checks_each_image_once_and_names_the_failing_pair(capsys):
    calls = []
    pairs = [{"fixed_image": f"f{i}_4x4x4", "moving_image": "m_4x4x4"} for i in range(5)]
    assert check_dataset(PairDataset(pairs, transform=_shape_loader(calls)), progress_seconds=0) is not None
    assert sorted(calls) == sorted(["m_4x4x4"] + [f"f{i}_4x4x4" for i in range(5)])  # m once, not 5 times
    assert "checked 5 of 5 pairs (6 images" in capsys.readouterr().out  # progress lines
    pairs.append({"fixed_image": "f_broken_4x4x4", "moving_image": "m_4x4x4"})
    with pytest.raises(ValueError, match=r"input 6 of 6, fixed f_broken_4x4x4: Compressed file ended"):
        check_dataset(PairDataset(pairs, transform=_shape_loader([])))


def test_check_dataset_refuses_pairs_on_two_grids_and_too_many_voxels():
    pairs = [{"fixed_image": "a_4x4x4", "moving_image": "b_4x4x8"}]
    with pytest.raises(
        ValueError, match=r"input 1 of 1: fixed a_4x4x4 becomes \(4, 4, 4\) and moving b_4x4x8 becomes \(4, 4, 8\)"
    ):
        check_dataset(PairDataset(pairs, transform=_shape_loader([])))
    pairs = [{"fixed_image": "a_8x8x8", "moving_image": "b_8x8x8"}]
    assert check_dataset(PairDataset(pairs, transform=_shape_loader([])), max_voxels=512) is not None
    with pytest.raises(ValueError, match=r"fixed a_8x8x8 is 8x8x8 voxels after padding, more than max_voxels=511"):
        check_dataset(PairDataset(pairs, transform=_shape_loader([])), max_voxels=511)
