"""Bad inputs given to the real inference config, as a user runs it (``python -m monai.bundle run``
in a subprocess) on a broken copy of the sample data: each is refused with a message naming the file
and the problem, a non-zero exit, no output files and the inputs untouched; or, where the input is
legitimately usable (huge intensities, float label maps, MSD cases of different sizes), it works.
The cases of issue 6 not covered by ``test_bundle.py``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"
HIPPO = ROOT.parent / "shared" / "data" / "hippocampus_msd"
FIXED = "HippocampusMR_0367_0000.nii.gz"  # the fixed image of the first registration_val pair
MOVING = "HippocampusMR_0394_0000.nii.gz"  # ... and its moving image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A state dict of the inference config's own network (random weights): models/model.pt may not exist."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def infer(dataset_dir: Path, output_dir: Path, ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), "--ckpt_path", str(ckpt), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (which files exist, and their bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit(path: Path, fn, dtype=None) -> None:
    """Rewrites the NIfTI ``path`` with ``fn(array, affine) -> (array, affine)``."""
    img = nib.load(path)
    array, affine = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype or array.dtype), affine), path)


def _shift(a, aff):
    aff[0, 3] += 5.0  # 5 mm
    return a, aff


def _with(value, dtype=np.float32):
    """One voxel set to ``value``, the array stored as ``dtype``."""
    def fn(a, aff):
        a = a.astype(dtype)
        a[32, 32, 32] = value
        return a, aff
    return fn


def _crop_moving(data: Path) -> None:
    for sub in ("imagesTr", "labelsTr"):  # image and label stay consistent with each other
        edit(data / sub / MOVING, lambda a, aff: (a[:60], aff))


def _pair_file(data: Path, name: str, text: str) -> list[str]:
    path = data.parent / name  # a user's pair list, outside the dataset folder
    path.write_text(text)
    return ["--pairs_selection", str(path)]


# name: (break the copy, returning extra CLI args or None; names the message must contain, problem words)
REFUSED = {
    "label_affine_shifted": (
        lambda d: edit(d / "labelsTr" / FIXED, _shift),
        [f"labelsTr/{FIXED}"], ["affine"]),
    "fixed_moving_different_grids": (
        _crop_moving,
        [f"imagesTr/{FIXED}", f"imagesTr/{MOVING}", "(64, 64, 64)", "(60, 64, 64)"], ["voxel grid"]),
    "label_value_half": (
        lambda d: edit(d / "labelsTr" / FIXED, _with(0.5)),
        [f"labelsTr/{FIXED}"], ["non-integer"]),
    "label_value_7": (
        lambda d: edit(d / "labelsTr" / FIXED, _with(7, np.uint8)),
        [f"labelsTr/{FIXED}"], ["[7]", "outside 0..2"]),
    "nan_voxel": (
        lambda d: edit(d / "imagesTr" / FIXED, _with(np.nan)),
        [f"imagesTr/{FIXED}"], ["NaN"]),
    "inf_voxel": (
        lambda d: edit(d / "imagesTr" / FIXED, _with(np.inf)),
        [f"imagesTr/{FIXED}"], ["infinite"]),
    "constant_image": (
        lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (np.full_like(a, 100), aff)),
        [f"imagesTr/{FIXED}"], ["constant"]),
    "2d_image": (
        lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (a[:, :, 32], aff)),
        [f"imagesTr/{FIXED}"], ["expected a 3-D image", "(64, 64)"]),
    "4d_image": (
        lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (np.stack([a, a], -1), aff)),
        [f"imagesTr/{FIXED}"], ["expected a 3-D image", "(64, 64, 64, 2)"]),
    "pair_list_json_object": (
        lambda d: _pair_file(d, "pairs.json", json.dumps({"fixed": f"./imagesTr/{FIXED}", "moving": f"./imagesTr/{MOVING}"})),
        ["pairs.json"], ["must be a list"]),
    "pair_list_csv_missing_moving": (
        lambda d: _pair_file(d, "pairs.csv", f"fixed,moving\n./imagesTr/{FIXED},./imagesTr/{MOVING}\n./imagesTr/{MOVING}\n"),
        ["pairs.csv"], ["pair 2 needs a 'fixed' and a 'moving' path"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_input_is_refused_naming_the_file(tmp_path, ckpt, case):
    breaker, names, problem = REFUSED[case]
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    args = breaker(data) or []
    before = digest(tmp_path)
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, *args)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    for text in names + problem:
        assert text in proc.stderr, f"{text!r} not in the error:\n{proc.stderr[-3000:]}"
    assert "Engine run" not in log, "the registration started despite the bad input"
    assert not out.exists() or not any(out.iterdir()), "output written despite bad input"
    assert digest(tmp_path) == before, "inputs modified or files written next to them"


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, ckpt):
    # As root, chmod does not stop writes: a folder below a regular file cannot be created by anyone.
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    (tmp_path / "afile").write_text("not a folder\n")
    before = digest(tmp_path)
    proc = infer(data, tmp_path / "afile" / "out", ckpt)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert f"output folder {tmp_path / 'afile' / 'out'} cannot be created" in proc.stderr, proc.stderr[-3000:]
    assert "is a file, not a folder" in proc.stderr
    # Refused first thing: before the inputs are checked, the checkpoint loaded or any pair registered.
    assert "check_dataset" not in proc.stderr and "Restored" not in log and "Engine run" not in log, log[-3000:]
    assert digest(tmp_path) == before, "something was written"


def _outputs_are_sane(out: Path, pairs: list[tuple[str, str]], shape=(64, 64, 64)) -> None:
    for f_id, m_id in pairs:
        disp = nib.load(out / f"disp_{f_id}_0000_{m_id}_0000.nii.gz")
        field = np.asarray(disp.dataobj)
        assert field.shape == (*shape, 3) and field.dtype == np.float32
        assert np.isfinite(field).all() and np.abs(field).max() < max(shape), (f_id, m_id)
        warped = np.asarray(nib.load(out / f"warped_image_{f_id}_{m_id}.nii.gz").dataobj)
        assert np.isfinite(warped).all()
        assert set(np.unique(nib.load(out / f"warped_label_{f_id}_{m_id}.nii.gz").dataobj)) <= {0, 1, 2}
    assert len((out / "timing.csv").read_text().splitlines()) == len(pairs) + 1
    assert not list(out.glob(".tmp-*")), "temporary files left behind"


SAMPLE_PAIRS = [("0367", "0394"), ("0375", "0385"), ("0385", "0375"), ("0394", "0367")]
USABLE = {
    # per-image normalisation: intensities up to 1e7 are fine
    "intensities_up_to_1e7": lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (a * (1e7 / a.max()), aff), np.float32),
    # label maps stored as float32 holding 0.0 / 1.0 / 2.0
    "float_labels": lambda d: edit(d / "labelsTr" / FIXED, lambda a, aff: (a, aff), np.float32),
}


@pytest.mark.parametrize("case", list(USABLE))
def test_usable_odd_input_works(tmp_path, ckpt, case):
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    USABLE[case](data)
    before = digest(data)
    out = tmp_path / "out"
    proc = infer(data, out, ckpt)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _outputs_are_sane(out, SAMPLE_PAIRS)
    assert digest(data) == before, "inputs modified"


@pytest.mark.skipif(not HIPPO.is_dir(), reason="needs ../shared/data/hippocampus_msd")
def test_msd_cases_of_different_shapes_still_work(tmp_path, ckpt):
    """The same-grid check is for Learn2Reg folders only: MSD cases differ in size and are padded."""
    data = tmp_path / "msd"
    names = ["hippocampus_001.nii.gz", "hippocampus_003.nii.gz", "hippocampus_004.nii.gz"]
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(HIPPO / sub / name, data / sub / name)
    index = {"training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names]}
    (data / "dataset.json").write_text(json.dumps(index))
    assert nib.load(data / "imagesTr" / names[1]).shape != nib.load(data / "imagesTr" / names[2]).shape
    before = digest(data)
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, "--num_val", "2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _outputs_are_sane(out, [("0003", "0004"), ("0004", "0003")])
    assert digest(data) == before, "inputs modified"
