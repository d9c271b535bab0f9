"""scripts/convert.py: MSD Task04 folder -> Learn2Reg layout, and the embedded sample_data built with it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import forkserver
import nibabel as nib
import numpy as np
import pytest
from conftest import HIPPO

from scripts.convert import ConversionError, msd_to_learn2reg
from scripts.learn2reg import pairs, training_cases

REPO = Path(__file__).resolve().parents[1]
MSD = HIPPO
SAMPLE = REPO / "sample_data" / "HippocampusMR"
SAMPLE_IDS = [331, 338, 351, 356, 367, 375, 385, 394]
# 3 and 243: float32 label files; 331: origin 0 instead of 1; 351: uint8 image; odd and even sizes.
IDS = [3, 17, 243, 331, 351, 394]
NUM_VAL = 4
SIZE = (64, 64, 64)

needs_msd = pytest.mark.skipif(
    not (MSD / "dataset.json").is_file(), reason=f"shared MSD hippocampus data not found at {MSD}"
)


def msd_files(number: int) -> tuple[Path, Path]:
    name = f"hippocampus_{number:03d}.nii.gz"
    return MSD / "imagesTr" / name, MSD / "labelsTr" / name


def out_name(number: int) -> str:
    return f"HippocampusMR_{number:04d}_0000.nii.gz"


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def pad_before(shape, size=SIZE) -> np.ndarray:
    """MONAI's centre pad (SpatialPad method="symmetric") puts diff // 2 zeros before."""
    return np.array([(t - s) // 2 for s, t in zip(shape, size, strict=True)])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    inputs = [f for n in IDS for f in msd_files(n)] + [MSD / "dataset.json"]
    before = digest(inputs)
    out = tmp_path_factory.mktemp("conv") / "HippocampusMR"
    assert msd_to_learn2reg(str(MSD), str(out), num_val=NUM_VAL, ids=IDS) == str(out)
    assert digest(inputs) == before, "input files were modified"
    return out


def make_msd_copy(root: Path, numbers) -> Path:
    """A small MSD folder in tmp_path with copies of real cases (safe to break)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    index = json.loads((MSD / "dataset.json").read_text())
    index["training"] = []
    for n in numbers:
        image, label = msd_files(n)
        shutil.copy(image, root / "imagesTr" / image.name)
        shutil.copy(label, root / "labelsTr" / label.name)
        index["training"].append({"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{label.name}"})
    index["numTraining"] = len(numbers)
    (root / "dataset.json").write_text(json.dumps(index, indent=4))
    return root


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
        assert not leftovers, f"temporary folders left behind: {leftovers}"


# ---------------------------------------------------------------- real cases


@needs_msd
def test_files_shapes_and_dtypes(converted):
    images = sorted(p.name for p in (converted / "imagesTr").iterdir())
    assert images == sorted(out_name(n) for n in IDS)
    assert sorted(p.name for p in (converted / "labelsTr").iterdir()) == images
    assert sorted(p.name for p in converted.iterdir()) == ["HippocampusMR_dataset.json", "imagesTr", "labelsTr"]
    for name in images:
        image, label = nib.load(converted / "imagesTr" / name), nib.load(converted / "labelsTr" / name)
        assert image.shape == SIZE and label.shape == SIZE
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(image.affine, label.affine)


@needs_msd
@pytest.mark.parametrize("number", IDS)
def test_voxels_and_affine(converted, number):
    src_image, src_label = (nib.load(p) for p in msd_files(number))
    image = nib.load(converted / "imagesTr" / out_name(number))
    label = nib.load(converted / "labelsTr" / out_name(number))
    shape = src_image.shape
    b = pad_before(shape)
    centre = tuple(slice(o, o + s) for o, s in zip(b, shape, strict=True))

    original = np.asanyarray(src_image.dataobj).astype(np.float32)
    data = np.asanyarray(image.dataobj)
    np.testing.assert_array_equal(data[centre], original)
    outside = data.copy()
    outside[centre] = 0
    assert not outside.any(), "padding must be zeros"

    original_label = np.asanyarray(src_label.dataobj)
    labels = np.asanyarray(label.dataobj)
    np.testing.assert_array_equal(labels[centre], original_label.astype(np.uint8))
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    for value in (1, 2):
        assert np.count_nonzero(labels == value) == np.count_nonzero(original_label == value)
    assert np.count_nonzero(labels == 0) == np.count_nonzero(original_label == 0) + np.prod(SIZE) - np.prod(shape)
    assert np.count_nonzero(labels == 1) > 0 and np.count_nonzero(labels == 2) > 0

    # same voxel grid in physical space: the origin moves by minus the padding times spacing
    expected = src_image.affine.copy()
    expected[:3, 3] -= src_image.affine[:3, :3] @ b
    np.testing.assert_allclose(image.affine, expected, atol=1e-5)
    np.testing.assert_allclose(image.header.get_zooms(), src_image.header.get_zooms())
    assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(src_image.affine)  # no reorientation


@needs_msd
def test_dataset_json(converted):
    index = json.loads((converted / "HippocampusMR_dataset.json").read_text())
    msd_index = json.loads((MSD / "dataset.json").read_text())
    assert index["name"] == "HippocampusMR"
    assert index["tensorImageShape"] == {"0": [64, 64, 64]}
    assert index["labels"] == {"0": msd_index["labels"]}
    assert set(index["labels"]["0"]) == {"0", "1", "2"}
    assert index["modality"] == msd_index["modality"]
    assert index["training"] == [
        {"image": f"./imagesTr/{out_name(n)}", "label": f"./labelsTr/{out_name(n)}"} for n in IDS
    ]
    assert index["test"] == [] and index["training_paired_images"] == [] and index["registration_test"] == []
    val = IDS[-NUM_VAL:]
    assert index["registration_val"] == [
        {"fixed": f"./imagesTr/{out_name(f)}", "moving": f"./imagesTr/{out_name(m)}"}
        for f, m in zip(val, val[::-1], strict=True)
    ]
    assert index["numRegistration_val"] == NUM_VAL
    assert "CC-BY-SA 4.0" in index["licence"]
    assert "Medical Segmentation Decathlon" in index["description"] and "Task04" in index["description"]


@needs_msd
def test_reads_back_with_learn2reg_reader(converted):
    val = [f"{n:04d}" for n in IDS[-NUM_VAL:]]
    got = pairs(str(converted), "registration_val")
    assert [(p["fixed_id"], p["moving_id"]) for p in got] == list(zip(val, val[::-1], strict=True))
    for p in got:
        assert p["fixed_label"].endswith(os.path.join("labelsTr", out_name(int(p["fixed_id"]))))
        assert os.path.isfile(p["moving_label"])
    assert [c["id"] for c in training_cases(str(converted), NUM_VAL)] == [f"{n:04d}" for n in IDS[:-NUM_VAL]]
    assert len(training_cases(str(converted), NUM_VAL, exclude_val=False)) == len(IDS)


@needs_msd
def test_crop_is_monai_centre_crop(tmp_path):
    """Volumes larger than size are centre cropped as ResizeWithPadOrCrop does; lost labels warn."""
    numbers = [331, 338, 351, 356]
    out = tmp_path / "cropped"
    with pytest.warns(UserWarning, match="removed .* labelled voxels"):
        msd_to_learn2reg(str(MSD), str(out), task="Crop", size=(15, 64, 64), num_val=2, ids=numbers)
    for n in numbers:
        src = nib.load(msd_files(n)[0])
        image = nib.load(out / "imagesTr" / f"Crop_{n:04d}_0000.nii.gz")
        assert image.shape == (15, 64, 64)
        start = src.shape[0] // 2 - 15 // 2  # CenterSpatialCrop (not (s - 15) // 2 for even s)
        b = pad_before(src.shape[1:], (64, 64))
        expected = np.asanyarray(src.dataobj).astype(np.float32)[start : start + 15]
        np.testing.assert_array_equal(
            np.asanyarray(image.dataobj)[:, b[0] : b[0] + src.shape[1], b[1] : b[1] + src.shape[2]], expected
        )
        np.testing.assert_allclose(image.affine[:3, 3], src.affine[:3, 3] + src.affine[:3, :3] @ [start, -b[0], -b[1]])


# ---------------------------------------------------------------- sample_data


def test_sample_data_reads_back():
    if not SAMPLE.is_dir():
        pytest.fail(f"{SAMPLE} is missing: the bundle's default data")
    val = [f"{n:04d}" for n in SAMPLE_IDS[4:]]
    got = pairs(str(SAMPLE), "registration_val")
    assert [(p["fixed_id"], p["moving_id"]) for p in got] == list(zip(val, val[::-1], strict=True))
    assert all("fixed_label" in p and "moving_label" in p for p in got)
    assert [c["id"] for c in training_cases(str(SAMPLE))] == [f"{n:04d}" for n in SAMPLE_IDS[:4]]
    index = json.loads((SAMPLE / "HippocampusMR_dataset.json").read_text())
    assert index["tensorImageShape"] == {"0": [64, 64, 64]} and "CC-BY-SA 4.0" in index["licence"]
    for entry in index["training"]:
        image, label = nib.load(SAMPLE / entry["image"]), nib.load(SAMPLE / entry["label"])
        assert image.shape == label.shape == SIZE
        assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 1, 2}
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert size < 3_000_000, f"sample_data is {size} bytes"
    assert (REPO / "sample_data" / "README.md").is_file() and (REPO / "docs" / "data_license.txt").is_file()


@needs_msd
def test_sample_data_cases_are_held_out():
    """The sample cases come from the last 40 ids of the MSD folder, which training on it holds out."""
    last40 = [int(c["id"]) for c in training_cases(str(MSD), 40, exclude_val=False)][-40:]
    assert set(SAMPLE_IDS) <= set(last40)


@needs_msd
def test_cli_rebuilds_sample_data(tmp_path):
    """The exact command in sample_data/README.md reproduces the embedded data."""
    out = tmp_path / "HippocampusMR"
    ids = "[" + ",".join(map(str, SAMPLE_IDS)) + "]"
    cmd = [sys.executable, "-m", "scripts.convert", "--msd_dir", str(MSD), "--out_dir", str(out)]
    cmd += ["--ids", ids, "--num_val", "4"]
    readme = (REPO / "sample_data" / "README.md").read_text()
    assert f'--ids "{ids}" --num_val 4' in readme  # noqa: B907 (the README's own quoting)
    forkserver.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert json.loads((out / "HippocampusMR_dataset.json").read_text()) == json.loads(
        (SAMPLE / "HippocampusMR_dataset.json").read_text()
    )
    for n in SAMPLE_IDS:
        for folder in ("imagesTr", "labelsTr"):
            new, old = nib.load(out / folder / out_name(n)), nib.load(SAMPLE / folder / out_name(n))
            np.testing.assert_array_equal(np.asanyarray(new.dataobj), np.asanyarray(old.dataobj))
            np.testing.assert_array_equal(new.affine, old.affine)
            assert new.get_data_dtype() == old.get_data_dtype()


# ---------------------------------------------------------------- bad input


@needs_msd
def test_missing_label_file(tmp_path):
    msd = make_msd_copy(tmp_path / "msd", [331, 338, 351, 356])
    (msd / "labelsTr" / "hippocampus_351.nii.gz").unlink()
    out = tmp_path / "out" / "HippocampusMR"
    with pytest.raises(ConversionError, match="hippocampus_351.nii.gz.*does not exist"):
        msd_to_learn2reg(str(msd), str(out), num_val=2)
    assert_nothing_written(out)


@needs_msd
def test_shape_mismatch(tmp_path):
    msd = make_msd_copy(tmp_path / "msd", [331, 338, 351, 356])
    label_path = msd / "labelsTr" / "hippocampus_356.nii.gz"
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[:-1], label.affine, label.header), label_path)
    out = tmp_path / "HippocampusMR"
    with pytest.raises(ConversionError, match=r"labelsTr/hippocampus_356\.nii\.gz: label shape"):
        msd_to_learn2reg(str(msd), str(out), num_val=2)
    assert_nothing_written(out)


@needs_msd
def test_not_3d(tmp_path):
    msd = make_msd_copy(tmp_path / "msd", [331, 338, 351, 356])
    path = msd / "imagesTr" / "hippocampus_338.nii.gz"
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), image.affine), path)
    out = tmp_path / "HippocampusMR"
    with pytest.raises(ConversionError, match=r"imagesTr/hippocampus_338\.nii\.gz: expected a 3-D image"):
        msd_to_learn2reg(str(msd), str(out), num_val=2)
    assert_nothing_written(out)


@needs_msd
def test_failure_during_conversion_leaves_nothing(tmp_path):
    """A problem only visible in the voxel data (a label value not in dataset.json) is found after
    some files were converted: the temporary folder is removed and out_dir never appears."""
    msd = make_msd_copy(tmp_path / "msd", [331, 338, 351, 356])
    path = msd / "labelsTr" / "hippocampus_356.nii.gz"
    label = nib.load(path)
    data = np.asanyarray(label.dataobj).copy()
    data[data == 2] = 3
    nib.save(nib.Nifti1Image(data, label.affine, label.header), path)
    out = tmp_path / "HippocampusMR"
    with pytest.raises(ConversionError, match=r"labelsTr/hippocampus_356\.nii\.gz: label values \[3\]"):
        msd_to_learn2reg(str(msd), str(out), num_val=2)
    assert_nothing_written(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msd"]


def test_missing_dataset_json(tmp_path):
    (tmp_path / "msd").mkdir()
    out = tmp_path / "HippocampusMR"
    with pytest.raises(ConversionError, match=r"msd/dataset\.json: missing"):
        msd_to_learn2reg(str(tmp_path / "msd"), str(out))
    assert_nothing_written(out)


@needs_msd
def test_bad_ids_and_num_val(tmp_path):
    out = tmp_path / "HippocampusMR"
    with pytest.raises(ConversionError, match=r"dataset\.json: ids \[2\] are not in the training list"):
        msd_to_learn2reg(str(MSD), str(out), ids=[1, 2, 3, 4, 6])
    with pytest.raises(ConversionError, match="num_val must be between 2 and 2"):
        msd_to_learn2reg(str(MSD), str(out), ids=[1, 3, 4, 6], num_val=4)
    with pytest.raises(ConversionError, match="num_val must be even"):
        msd_to_learn2reg(str(MSD), str(out), ids=[1, 3, 4, 6, 8], num_val=3)
    assert_nothing_written(out)


@needs_msd
def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "HippocampusMR"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="output folder .*HippocampusMR already exists and is not empty"):
        msd_to_learn2reg(str(MSD), str(out), num_val=2, ids=[331, 338, 351, 356])
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["HippocampusMR"]


@needs_msd
def test_cli_error_is_one_line(tmp_path):
    out = tmp_path / "HippocampusMR"
    out.mkdir()
    (out / "x").write_text("")
    cmd = [sys.executable, "-m", "scripts.convert", "--msd_dir", str(MSD), "--out_dir", str(out)]
    result = forkserver.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert (
        "error:" in result.stderr
        and "already exists and is not empty" in result.stderr
        and "Traceback" not in result.stderr
    )
