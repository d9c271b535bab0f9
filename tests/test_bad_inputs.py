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
import stat
import subprocess
import sys
import time
from pathlib import Path

import forkserver
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import HIPPO
from monai.networks.nets import UNet

from scripts.networks import SpatialGradientRegNet

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"
FIXED = "HippocampusMR_0367_0000.nii.gz"  # the fixed image of the first registration_val pair
MOVING = "HippocampusMR_0394_0000.nii.gz"  # ... and its moving image


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


@pytest.fixture(scope="session")  # cheap: built in each worker, not grouped
def ckpt(tmp_path_factory) -> Path:
    """A state dict of the inference config's own network (random weights): models/model.pt may not exist."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def infer(dataset_dir: Path, output_dir: Path, ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        "--ckpt_path",
        str(ckpt),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def evaluate(dataset_dir: Path, disp_dir: Path, pairs_selection: str) -> subprocess.CompletedProcess:
    """configs/evaluate.json on ``disp_dir``, in a subprocess."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate.json",
           "--dataset_dir", str(dataset_dir), "--disp_dir", str(disp_dir), "--pairs_selection", pairs_selection]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def infer_here(dataset_dir: Path, output_dir: Path, ckpt: Path, args: list[str]) -> str | None:
    """configs/inference.json run in this process by ``monai.bundle.run``, the function
    ``python -m monai.bundle run`` calls, with the same overrides (``--key value`` pairs) but without
    the seconds a new process spends importing MONAI. Returns the error's message chain, or None."""
    from monai.bundle import run

    overrides = {k[2:]: v for k, v in zip(args[::2], args[1::2], strict=True)}
    try:
        run(
            config_file=str(ROOT / "configs" / "inference.json"),
            logging_file=str(ROOT / "configs" / "logging.conf"),
            bundle_root=str(ROOT),
            dataset_dir=str(dataset_dir),
            output_dir=str(output_dir),
            ckpt_path=str(ckpt),
            **overrides,
        )
    except Exception as e:
        messages = []
        while e is not None:
            messages.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        return "\n".join(messages)
    return None


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (which files exist, and their bytes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


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
    "label_affine_shifted": (lambda d: edit(d / "labelsTr" / FIXED, _shift), [f"labelsTr/{FIXED}"], ["affine"]),
    "fixed_moving_different_grids": (
        _crop_moving,
        [f"imagesTr/{FIXED}", f"imagesTr/{MOVING}", "(64, 64, 64)", "(60, 64, 64)"],
        ["voxel grid"],
    ),
    "label_value_half": (lambda d: edit(d / "labelsTr" / FIXED, _with(0.5)), [f"labelsTr/{FIXED}"], ["non-integer"]),
    "label_value_7": (
        lambda d: edit(d / "labelsTr" / FIXED, _with(7, np.uint8)),
        [f"labelsTr/{FIXED}"],
        ["[7]", "outside 0..2"],
    ),
    "nan_voxel": (lambda d: edit(d / "imagesTr" / FIXED, _with(np.nan)), [f"imagesTr/{FIXED}"], ["NaN"]),
    "inf_voxel": (lambda d: edit(d / "imagesTr" / FIXED, _with(np.inf)), [f"imagesTr/{FIXED}"], ["infinite"]),
    "constant_image": (
        lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (np.full_like(a, 100), aff)),
        [f"imagesTr/{FIXED}"],
        ["constant"],
    ),
    "2d_image": (
        lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (a[:, :, 32], aff)),
        [f"imagesTr/{FIXED}"],
        ["expected a 3-D image", "(64, 64)"],
    ),
    "4d_image": (
        lambda d: edit(d / "imagesTr" / FIXED, lambda a, aff: (np.stack([a, a], -1), aff)),
        [f"imagesTr/{FIXED}"],
        ["expected a 3-D image", "(64, 64, 64, 2)"],
    ),
    "pair_list_json_object": (
        lambda d: _pair_file(
            d, "pairs.json", json.dumps({"fixed": f"./imagesTr/{FIXED}", "moving": f"./imagesTr/{MOVING}"})
        ),
        ["pairs.json"],
        ["must be a list"],
    ),
    "pair_list_csv_missing_moving": (
        lambda d: _pair_file(
            d, "pairs.csv", f"fixed,moving\n./imagesTr/{FIXED},./imagesTr/{MOVING}\n./imagesTr/{MOVING}\n"
        ),
        ["pairs.csv"],
        ["pair 2 needs a 'fixed' and a 'moving' path"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_input_is_refused_naming_the_file(tmp_path, ckpt, case):
    breaker, names, problem = REFUSED[case]
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    args = breaker(data) or []
    before = digest(tmp_path)
    out = tmp_path / "out"
    error = infer_here(data, out, ckpt, args)
    assert error is not None, "the bad input was accepted"
    for text in names + problem:
        assert text in error, f"{text!r} not in the error:\n{error[-3000:]}"
    assert "ValueError" in error or "DatasetError" in error, error[-3000:]  # an input check, not a crash
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


def _outputs_are_sane(out: Path, pairs: list[tuple[str, str]], shapes=None) -> None:
    for f_id, m_id in pairs:
        shape = (shapes or {}).get(f_id, (64, 64, 64))
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
    "intensities_up_to_1e7": lambda d: edit(
        d / "imagesTr" / FIXED, lambda a, aff: (a * (1e7 / a.max()), aff), np.float32
    ),
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
    error = infer_here(data, out, ckpt, ["--figures", "False"])
    assert error is None, error
    _outputs_are_sane(out, SAMPLE_PAIRS)
    assert digest(data) == before, "inputs modified"


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"needs {HIPPO} (BUNDLE_TEST_DATA)")
def test_msd_cases_of_different_shapes_still_work(tmp_path, ckpt):
    """The same-grid check is for Learn2Reg folders only: MSD cases differ in size and are padded to one
    grid for the network; every output comes back on its fixed image's own grid, and the field indexes
    the moving image's own array: the official evaluation's warp of the moving label map with the
    written field gives the written warped label map."""
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
    shapes = {n[12:15].rjust(4, "0"): nib.load(data / "imagesTr" / n).shape for n in names}
    _outputs_are_sane(out, [("0003", "0004"), ("0004", "0003")], shapes)
    assert digest(data) == before, "inputs modified"
    from scripts.metrics import warp_labels_official

    for f, m in [("003", "004"), ("004", "003")]:
        fixed = nib.load(data / "imagesTr" / f"hippocampus_{f}.nii.gz")
        field = nib.load(out / f"disp_0{f}_0000_0{m}_0000.nii.gz")
        assert np.allclose(field.affine, fixed.affine)  # the fixed image's own grid and header
        moving_label = np.asarray(nib.load(data / "labelsTr" / f"hippocampus_{m}.nii.gz").dataobj)
        official = warp_labels_official(moving_label, np.asarray(field.dataobj))
        written = np.asarray(nib.load(out / f"warped_label_0{f}_0{m}.nii.gz").dataobj)
        assert official.shape == written.shape == fixed.shape
        assert (official == written).mean() > 0.999, (f, m, (official == written).mean())


# --------------------------------------------------------------------------- outputs never lost or mixed (issue 13)
def _one_pair(data: Path, rows: list[tuple[str, str]], name="pairs.csv", bom=False) -> list[str]:
    text = "fixed,moving\n" + "".join(f"{f},{m}\n" for f, m in rows)
    path = data.parent / name
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return ["--pairs_selection", str(path), "--figures", "False"]


def _copy(tmp_path: Path) -> Path:
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    return data


def test_colliding_output_names_are_refused_naming_both_images(tmp_path, ckpt):
    data = _copy(tmp_path)
    other = data / "other" / "imagesTr"
    other.mkdir(parents=True)
    shutil.copy(data / "imagesTr" / MOVING, other / FIXED)  # another image with the case number 0367
    before = digest(tmp_path)
    out = tmp_path / "out"
    args = _one_pair(
        data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}"), (f"./other/imagesTr/{FIXED}", f"./imagesTr/{MOVING}")]
    )
    proc = infer(data, out, ckpt, *args)
    assert proc.returncode != 0
    assert f"imagesTr/{FIXED}" in proc.stderr and f"other/imagesTr/{FIXED}" in proc.stderr, proc.stderr[-3000:]
    assert "disp_0367_0000_0394_0000.nii.gz" in proc.stderr and "4-digit case ids only" in proc.stderr
    args = _one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")] * 2)
    proc = infer(data, out, ckpt, *args)
    assert proc.returncode != 0 and "is listed twice" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    assert {k: v for k, v in digest(tmp_path).items() if not k.endswith(".csv")} == before


def test_non_empty_output_folder_is_replaced_only_with_overwrite_and_only_whole(tmp_path, ckpt):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    args = _one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")])
    assert infer(data, out, ckpt, *args).returncode == 0
    first = digest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["path"] == str(ckpt)
    assert set(manifest["files"]) == set(first) - {"manifest.json"}
    # a second run into the complete folder: refused before any work, the folder untouched
    proc = infer(data, out, ckpt, *args)
    assert proc.returncode != 0 and f"output folder {out} already exists and is not empty" in proc.stderr
    assert "--overwrite True" in proc.stderr and "Restored" not in proc.stdout + proc.stderr
    assert digest(out) == first
    # with --overwrite True, a run killed midway leaves the first run whole ...
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--ckpt_path",
        str(ckpt),
        "--overwrite",
        "True",
        "--figures",
        "False",
    ]
    run = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    staged = []
    for _ in range(1200):  # wait until it has written into its staging folder, then kill it
        staged = [p for p in tmp_path.glob(".tmp-*") if any(p.glob("disp_*"))]
        if staged or run.poll() is not None:
            break
        time.sleep(0.1)
    run.kill()
    run.wait()
    assert staged, "the run finished or failed before it wrote anything"
    assert digest(out) == first
    # ... and the next run clears its leftovers and replaces the folder as a whole
    assert infer(data, out, ckpt, *args, "--overwrite", "True").returncode == 0
    assert not list(tmp_path.glob(".tmp-*")), "the killed run's staging folder was not removed"
    assert set(digest(out)) == set(first) and json.loads((out / "manifest.json").read_text())["created"]


def test_evaluation_refuses_a_folder_mixing_two_runs(tmp_path, ckpt):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    rows = [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}"), (f"./imagesTr/{MOVING}", f"./imagesTr/{FIXED}")]
    args = _one_pair(data, rows)
    assert infer(data, out, ckpt, *args).returncode == 0
    a, b = out / "disp_0367_0000_0394_0000.nii.gz", out / "disp_0394_0000_0367_0000.nii.gz"
    shutil.copy(b, a)  # a field that run did not write for this pair
    proc = evaluate(data, out, args[1])
    assert proc.returncode != 0 and f"{a}: was changed since it was written" in proc.stderr, proc.stderr[-3000:]
    assert "mixes the results of several runs" in proc.stderr and not (out / "metrics.json").exists()
    (out / "manifest.json").unlink()  # the user takes responsibility: scored as it is
    assert evaluate(data, out, args[1]).returncode == 0


def test_non_finite_fields(tmp_path, ckpt):
    """NaN weights: inference stops naming the pairs, nothing written. A NaN field given to
    evaluate.json: a counted, reported invalid pair; a truncated field: an error naming the file."""
    data = _copy(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(state, nan_ckpt)
    out = tmp_path / "out"
    rows = [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}"), (f"./imagesTr/{MOVING}", f"./imagesTr/{FIXED}")]
    args = _one_pair(data, rows)
    proc = infer(data, out, nan_ckpt, *args)
    message = "NaN or infinite values for fixed 0367 / moving 0394"
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))

    # fields as another tool would write them (no manifest): zero, one with a NaN voxel
    out.mkdir()
    affine = nib.load(data / "imagesTr" / FIXED).affine
    for f, m in (("0367", "0394"), ("0394", "0367")):
        field = np.zeros((64, 64, 64, 3), np.float32)
        field[10, 10, 10, 0] = np.nan if f == "0367" else 0.0
        nib.save(nib.Nifti1Image(field, affine), out / f"disp_{f}_0000_{m}_0000.nii.gz")
    bad = out / "disp_0367_0000_0394_0000.nii.gz"
    proc = evaluate(data, out, args[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: 1 of 2 pairs have a displacement field with NaN or infinite values" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_invalid"] == 1 and metrics["dice"]["n"] == 1
    assert metrics["invalid_pairs"][0]["file"] == bad.name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = evaluate(data, out, args[1])
    assert proc.returncode != 0 and f"{bad}: cannot read the displacement field" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("value, figures", [("false", False), ("0", False), ("true", True), ("maybe", None)])
def test_boolean_options_mean_what_they_say(tmp_path, ckpt, value, figures):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    args = [
        a for a in _one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")]) if a not in ("--figures", "False")
    ]
    proc = infer(data, out, ckpt, *args, "--figures", value)
    if figures is None:
        assert (
            proc.returncode != 0
            and "--figures: expected True or False (also true/false/1/0), got 'maybe'" in proc.stderr
        )
        assert not out.exists()
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bool(list(out.glob("figure_*.png"))) == figures


@pytest.mark.parametrize(
    "option, message",
    [
        ("--ouput_dir", "--ouput_dir: unknown key for configs/inference.json; did you mean --output_dir?"),
        ("--datset_dir", "--datset_dir: unknown key for configs/inference.json; did you mean --dataset_dir?"),
        ("--write_inverse", "--write_inverse was renamed: use --write_fixed_to_moving"),
    ],
)
def test_misspelled_or_renamed_options_are_refused(tmp_path, ckpt, option, message):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, option, str(tmp_path / "x"))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("size", [48, 80])
def test_learn2reg_pairs_of_other_sizes_get_fields_on_their_own_grid(tmp_path, ckpt, size):
    """Not 64^3: registered on a padded grid (multiple of 16, at least 64) and written back on the
    fixed image's own grid and header."""
    data = _copy(tmp_path)
    for sub in ("imagesTr", "labelsTr"):
        for name in (FIXED, MOVING):
            if size < 64:
                edit(data / sub / name, lambda a, aff: (a[8 : 8 + size, 8 : 8 + size, 8 : 8 + size], aff))
            else:
                edit(data / sub / name, lambda a, aff: (np.pad(a, [(0, size - 64)] * 3), aff))
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, *_one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _outputs_are_sane(out, [("0367", "0394")], {"0367": (size,) * 3})
    assert np.allclose(
        nib.load(out / "disp_0367_0000_0394_0000.nii.gz").affine, nib.load(data / "imagesTr" / FIXED).affine
    )


def test_pairs_larger_than_max_voxels_are_refused_naming_the_shape(tmp_path, ckpt):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    proc = infer(
        data, out, ckpt, *_one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")]), "--max_voxels", "100000"
    )
    assert (
        proc.returncode != 0
        and f"imagesTr/{FIXED} is 64x64x64 voxels after padding, more than max_voxels=100000" in proc.stderr
    )
    assert not out.exists()


def test_csv_pair_list_with_a_byte_order_mark(tmp_path, ckpt):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, *_one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")], bom=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "disp_0367_0000_0394_0000.nii.gz").is_file()


def test_outputs_get_normal_permissions(tmp_path, ckpt):
    data = _copy(tmp_path)
    out = tmp_path / "out"
    cmd = (
        f"umask 022 && {sys.executable} -m monai.bundle run --config_file configs/inference.json --dataset_dir {data} "
        f"--output_dir {out} --ckpt_path {ckpt} "
        + " ".join(_one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")]))
    )
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_test_time_options_run_and_a_wrong_ensemble_member_is_refused(tmp_path, ckpt):
    data = _copy(tmp_path)
    args = _one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")])
    # as typed on the command line (a subprocess: fire parses the lists)
    options = [
        "--tta_flips",
        "[[0], [1, 2]]",
        "--ensemble_ckpts",
        f"[{str(ckpt)!r}]",
        "--io_steps",
        "2",
        "--io_grid",
        "2",
        "--field_sigma",
        "0.5",
        "--refine_passes",
        "2",
    ]
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, *args, *options)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())["settings"]
    assert manifest["tta_flips"] == [[0], [1, 2]] and manifest["ensemble_ckpts"] == [str(ckpt)]
    assert manifest["io_steps"] == 2 and manifest["io_grid"] == 2 and manifest["field_sigma"] == 0.5
    assert manifest["refine_passes"] == 2
    _outputs_are_sane(out, [("0367", "0394")])

    # a member of another architecture, or a missing one: refused naming the file, nothing written
    other = tmp_path / "wide.pt"
    torch.save(SpatialGradientRegNet(channels=(16, 32, 64, 128, 256), deep_supervision=False).state_dict(), other)
    missing = (tmp_path / "no.pt", "not found. Train one (configs/train.json with the same config files as this run, "
               "see docs/inference.md), fetch it with python -m scripts.weights download if large_files.yml lists it, "
               "or pass --ensemble_ckpts <file>")  # fmt: skip
    for member, problem in ((other, "was saved from another architecture"), missing):
        before = digest(tmp_path)
        error = infer_here(data, tmp_path / "out2", ckpt, args + ["--ensemble_ckpts", str(member)])  # one path
        assert error is not None and f"{member}: " in error and problem in error, error
        assert not (tmp_path / "out2").exists() and digest(tmp_path) == before


def test_segmentation_guided_optimisation_runs_and_its_segmenter_is_checked(tmp_path, ckpt):
    data = _copy(tmp_path)
    args = _one_pair(data, [(f"./imagesTr/{FIXED}", f"./imagesTr/{MOVING}")])
    seg = tmp_path / "seg.pt"  # untrained, of inference.json's segmenter architecture at a small width
    net = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1, norm="instance")
    torch.save(net.half().state_dict(), seg)  # float16, as a shipped file would be
    options = ["--io_steps", "2", "--io_similarity", "dice"]
    out = tmp_path / "out"
    proc = infer(data, out, ckpt, *args, *options, "--io_seg_channels", "[4, 8]", "--io_seg_ckpt", str(seg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())["settings"]
    assert manifest["io_similarity"] == "dice" and manifest["io_seg_ckpt"] == str(seg)
    assert manifest["io_seg_sha256"] == hashlib.sha256(seg.read_bytes()).hexdigest()
    _outputs_are_sane(out, [("0367", "0394")])

    # no segmenter, a missing one, one of another architecture: refused naming the file, nothing written
    cases = [
        ([], "needs a segmenter (inference.json: --io_seg_ckpt)"),
        (
            ["--io_seg_ckpt", str(tmp_path / "no.pt")],
            f"{tmp_path / 'no.pt'}: checkpoint not found. Train one (configs/io_seg_train.json --dataset_dir "
            "<your data>, see docs/inference.md), fetch it with python -m scripts.weights download if large_files.yml "
            "lists it, "
            "or pass --io_seg_ckpt <file>",
        ),
        (["--io_seg_ckpt", str(ckpt)], f"{ckpt}: was saved from another architecture"),
    ]
    for extra, problem in cases:
        before = digest(tmp_path)
        error = infer_here(data, tmp_path / "out2", ckpt, args + options + extra)
        assert error is not None and problem in error, error
        assert not (tmp_path / "out2").exists() and digest(tmp_path) == before
