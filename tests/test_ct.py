"""Abdominal CT task on the two real CTs of the abdomen_ct_samples test data (conftest.CT) (subject A: NIfTI,
3 mm; subject B: a DICOM series whose label file is stored in another orientation): reading,
labels on the right anatomy, the CT overlay for train / inference / evaluate, the prepare ->
register -> restore path back to the fixed scan's own grid, and bad input refused through the
command line (exit code 2, one line naming the file, no output folder, no staging leftovers,
inputs unchanged)."""

import hashlib
import json
import os
import shutil
import sys

import forkserver
import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CT

from scripts import ct_pair
from scripts.learn2reg import DatasetError
from scripts.networks import SpatialGradientRegNet
from tests.test_bundle import ROOT, TINY, bundle, ok

A_CT, A_LAB = CT / "subject_a" / "ct.nii.gz", CT / "subject_a" / "labels_l2r.nii.gz"
B_DICOM, B_LAB = CT / "subject_b" / "dicom", CT / "subject_b" / "labels_l2r.nii.gz"
OVERLAY = ("inference", "abdomen_ct")
DISP = "disp_0001_0000_0002_0000.nii.gz"  # the bundle's name for the prepared pair's field
LIVER, AORTA = 6, 8

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CT.is_dir(), reason=f"needs {CT} (BUNDLE_TEST_DATA)")]


UMASK = 0o022  # outputs must get 0o755 folders / 0o644 files under it, not mkdtemp's private 0o700


def ct_pair_cli(*args, ulimit: str | None = None, env=None):
    """``python -m scripts.ct_pair ARGS`` from the project root, under ``UMASK`` and, with
    ``ulimit`` (e.g. "-f 16"), under that bash resource limit."""
    cmd = [sys.executable, "-m", "scripts.ct_pair", *map(str, args)]
    if ulimit:
        cmd = ["bash", "-c", f'ulimit {ulimit} && exec "$@"', "bash", *cmd]
    return forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, umask=UMASK,
                          env={**os.environ, **(env or {})})  # fmt: skip


def fingerprint(*paths):
    """{file: (mtime, sha256)} of the files given and of every file under the folders given."""
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    return {str(f): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files}


def assert_refused(proc, out, *names, message, one_line=True):
    """Exit code 2, an error line holding ``message`` and naming every one of ``names``, no
    traceback, no ``out`` folder and no staging leftovers (.tmp-*) in the folder that would hold it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert all(str(n) in lines[-1] for n in names), (names, lines[-1])
    assert "Traceback" not in proc.stderr and (len(lines) == 1 or not one_line), proc.stderr
    assert not out.exists()
    parent = next(p for p in out.parents if p.is_dir())
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


def modes(folder):
    """{path relative to folder: permission bits} of the folder and everything in it."""
    paths = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in paths}


def assert_normal_permissions(folder):
    for path, mode in modes(folder).items():
        expected = (0o777 if (folder / path).is_dir() else 0o666) & ~UMASK
        assert mode == expected, f"{path}: {oct(mode)} instead of {oct(expected)}"


@pytest.fixture(scope="session")  # cheap: built in each worker, not grouped
def untrained_ckpt(tmp_path_factory):
    """A CT-overlay network of tiny width at initialisation (the identity): no CT weights can be
    trained on this machine, and the geometry checks below need a known deformation."""
    path = tmp_path_factory.mktemp("ckpt") / "ct_identity.pt"
    net = SpatialGradientRegNet(in_channels=3, channels=(4, 8, 16, 32, 64), act="relu", decoder_residual=False)
    torch.save(net.state_dict(), path)
    return path


# --------------------------------------------------------------------------- reading
def test_labels_land_on_the_anatomy_after_loading():
    a = ct_pair.read_image(str(A_CT))
    b = ct_pair.read_image(str(B_DICOM))
    assert tuple(itk.size(b)) == (512, 512, 20)
    a_hu, b_hu = itk.array_from_image(a), itk.array_from_image(b)
    a_lab = itk.array_from_image(ct_pair.read_label(str(A_LAB), a))
    b_lab = itk.array_from_image(ct_pair.read_label(str(B_LAB), b))
    # soft-tissue liver in both scans (A is unenhanced, B contrast-enhanced: aorta brighter than liver)
    assert 20 < a_hu[a_lab == LIVER].mean() < 80
    assert 40 < b_hu[b_lab == LIVER].mean() < 150
    assert b_hu[b_lab == AORTA].mean() > b_hu[b_lab == LIVER].mean() + 40
    # B's label file stores the grid with the second axis flipped: read naively it misses the liver
    raw = np.asarray(nib.load(B_LAB).dataobj).transpose(2, 1, 0)  # (z, y, x) like ITK arrays
    assert (raw == LIVER).sum() == (b_lab == LIVER).sum()  # nearest neighbour copies every voxel
    assert b_hu[raw == LIVER].mean() < b_hu[b_lab == LIVER].mean() - 30


# --------------------------------------------------------------------------- the overlay on Learn2Reg folders
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The real pair, fixed B (DICOM) and moving A, on a 192 x 160 x 256 grid (the AbdomenCTCT
    shape) at 2 mm, centre pre-alignment."""
    out = tmp_path_factory.mktemp("ct") / "prepared"
    proc = ct_pair_cli(
        "prepare", "--fixed", str(B_DICOM), "--moving", str(A_CT), "--fixed_label", str(B_LAB),
        "--moving_label", str(A_LAB), "--out_dir", str(out), "--prealign", "center", "--size", "192", "160", "256",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_prepared_folder_is_a_learn2reg_dataset(prepared):
    index = json.loads((prepared / "CTPair_dataset.json").read_text())
    assert index["registration_val"] == [
        {"fixed": "./imagesTr/CTPair_0001_0000.nii.gz", "moving": "./imagesTr/CTPair_0002_0000.nii.gz"}
    ]
    for name in ("imagesTr/CTPair_0001_0000.nii.gz", "labelsTr/CTPair_0002_0000.nii.gz"):
        img = nib.load(prepared / name)
        assert img.shape == (192, 160, 256)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), 2.0)
    labels = np.asarray(nib.load(prepared / "labelsTr/CTPair_0002_0000.nii.gz").dataobj)
    assert set(np.unique(labels)) <= set(range(14))  # values copied, never interpolated
    assert_normal_permissions(prepared)  # the published staging folder too, not only the files in it


@pytest.fixture(scope="module")
def registered(prepared, untrained_ckpt, tmp_path_factory):
    """The prepared pair registered by the CT overlay's inference (one run shared by the tests below)."""
    out = tmp_path_factory.mktemp("registered") / "registered"
    ok(bundle("--dataset_dir", str(prepared), "--output_dir", str(out), "--ckpt_path", str(untrained_ckpt),
              *TINY, configs=OVERLAY))  # fmt: skip
    return out


def test_inference_and_evaluate_with_the_ct_overlay(prepared, registered, tmp_path):
    out = tmp_path / "registered"
    shutil.copytree(registered, out)  # evaluate writes its metrics into the folder
    assert (out / "figure_0001_0002.png").is_file()
    disp = nib.load(out / DISP)
    assert disp.shape == (192, 160, 256, 3) and disp.get_data_dtype() == np.float32  # the official format
    assert np.abs(np.asarray(disp.dataobj)).max() == 0  # the untrained network is the identity
    ok(bundle("--dataset_dir", str(prepared), "--disp_dir", str(out), configs=("evaluate", "abdomen_ct")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["dice"]["mean"] < 1


def test_training_with_the_ct_overlay_uses_random_patches(prepared, tmp_path):
    # a Learn2Reg-layout folder with two more training scans (copies) outside the validation pair
    data = tmp_path / "CTPair"
    shutil.copytree(prepared, data)
    index = json.loads((data / "CTPair_dataset.json").read_text())
    for old, new in (("0001", "0003"), ("0002", "0004")):
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(data / sub / f"CTPair_{old}_0000.nii.gz", data / sub / f"CTPair_{new}_0000.nii.gz")
        index["training"].append(
            {"image": f"./imagesTr/CTPair_{new}_0000.nii.gz", "label": f"./labelsTr/CTPair_{new}_0000.nii.gz"}
        )
    (data / "CTPair_dataset.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    proc = ok(bundle("--dataset_dir", str(data), "--ckpt_dir", str(run), "--log_dir", str(run / "logs"),
                     "--max_epochs", "1", "--val_interval", "1", "--num_workers", "0", "--patch_size", "[32, 48, 64]",
                     *TINY, configs=("train", "abdomen_ct")))  # fmt: skip
    assert "val_mean_dice" in proc.stderr + proc.stdout
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["encoder.in_conv1.conv.weight"].shape[1] == 3  # three CT windows
    assert any(k.startswith("ds_heads.") for k in state)  # deep supervision, as the paper's CT model


# --------------------------------------------------------------------------- prepare -> register -> restore
def test_restore_puts_outputs_on_the_fixed_scans_own_grid(prepared, registered, tmp_path):
    reg = registered
    out = tmp_path / "result"
    proc = ct_pair_cli("restore", "--prepared_dir", str(prepared), "--disp_dir", str(reg), "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_normal_permissions(out)
    fixed = ct_pair.read_image(str(B_DICOM))
    for name in ("warped_moving.nii.gz", "warped_moving_label.nii.gz", "displacement_mm.nii.gz"):
        im = itk.imread(str(out / name))
        assert tuple(itk.size(im)) == (512, 512, 20), name
        assert np.allclose(itk.spacing(im), itk.spacing(fixed), atol=1e-4)
        assert np.allclose(itk.origin(im), itk.origin(fixed), atol=1e-3)
        assert np.allclose(itk.array_from_matrix(im.GetDirection()), itk.array_from_matrix(fixed.GetDirection()))
    warped_label = itk.array_from_image(itk.imread(str(out / "warped_moving_label.nii.gz")))
    assert set(np.unique(warped_label)) <= set(np.unique(np.asarray(nib.load(A_LAB).dataobj)))
    metrics = json.loads((out / "metrics.json").read_text())
    # Learn2Reg's rule: Dice over the organs present in the fixed AND the unwarped moving label map;
    # one warped out of the slab scores 0 (B is a 4 cm slab of the upper abdomen; centring a
    # whole-abdomen scan on it overlaps few organs)
    fixed_label = itk.array_from_image(ct_pair.read_label(str(B_LAB), fixed))  # on B's grid, as the warped map
    in_b, in_a = (set(np.unique(np.asarray(nib.load(p).dataobj)).astype(int).tolist()) - {0} for p in (B_LAB, A_LAB))
    assert metrics["labels_in_both"] == [str(k) for k in sorted(in_b & in_a)]
    for k in metrics["labels_in_both"]:  # against a hand computation on the written files
        a, b = fixed_label == int(k), warped_label == int(k)
        assert metrics["dice_per_label"][k] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-9)
    assert metrics["mean_dice"] == pytest.approx(np.mean(list(metrics["dice_per_label"].values())))
    # identity network: the deformable step changes nothing, so both Dice are the pre-alignment's
    assert metrics["mean_dice"] == pytest.approx(metrics["mean_dice_prealign_only"], abs=1e-6)


def test_same_scan_stored_differently_round_trips(tmp_path, untrained_ckpt):
    # Subject A stored a second time with its axes flipped (LPS instead of RAS storage, same
    # physical voxels): prepare (no pre-alignment), identity registration and restore must bring
    # its labels back onto A's own grid.
    img, lab = nib.load(A_CT), nib.load(A_LAB)
    flip = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS"))
    moving, moving_lab = tmp_path / "a_lps.nii.gz", tmp_path / "a_lps_labels.nii.gz"
    nib.save(img.as_reoriented(flip), moving)
    nib.save(lab.as_reoriented(flip), moving_lab)
    prepared, reg, out = tmp_path / "prepared", tmp_path / "registered", tmp_path / "result"
    ct_pair.prepare(str(A_CT), str(moving), str(prepared), str(A_LAB), str(moving_lab))
    ok(bundle("--dataset_dir", str(prepared), "--output_dir", str(reg), "--ckpt_path", str(untrained_ckpt),
              "--figures", "False", *TINY, configs=OVERLAY))  # fmt: skip
    metrics = ct_pair.restore(str(prepared), str(reg), str(out))
    # 3 mm -> 2 mm -> 3 mm nearest-neighbour round trip of the same scan
    assert metrics["mean_dice"] > 0.95, metrics
    warped = np.asarray(nib.load(out / "warped_moving.nii.gz").dataobj)
    assert np.corrcoef(warped.ravel(), np.asarray(img.dataobj).ravel())[0, 1] > 0.95
    assert np.abs(np.asarray(nib.load(out / "displacement_mm.nii.gz").dataobj)).max() < 1e-3


# --------------------------------------------------------------------------- bad input
def _several_series(tmp_path):
    folder = tmp_path / "two_series"
    shutil.copytree(B_DICOM, folder)
    # plus a second series: a small slice written by GDCM (which gives it a new series UID)
    itk.imwrite(itk.image_from_array(np.full((8, 8), -1000, dtype=np.int16)), str(folder / "other.dcm"))
    return folder


def _no_hu(tmp_path):
    img = nib.load(A_CT)
    path = tmp_path / "raw_values.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) + 1024).astype(np.uint16), img.affine), path)
    return path


def _dims(tmp_path, shape):
    path = tmp_path / f"image_{len(shape)}d.nii.gz"
    nib.save(nib.Nifti1Image(np.full(shape, -1000, dtype=np.int16), np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    "make, which, message",
    [
        (_several_series, "fixed", "holds 2 DICOM series"),
        (_no_hu, "fixed", "do not look like Hounsfield units"),
        (lambda t: _dims(t, (16, 16)), "moving", "expected a 3-D single-channel image, got a 2-D"),
        (lambda t: _dims(t, (16, 16, 16, 2)), "moving", "got a 4-D"),
        (None, "fixed_label", "is not the grid of"),
    ],
    ids=["several-dicom-series", "no-hu-scaling", "2d", "4d", "label-grid-mismatch"],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, make, which, message):
    args = {"fixed": str(B_DICOM), "moving": str(A_CT), "fixed_label": None}
    bad = str(make(tmp_path)) if make else str(A_LAB)  # A's label map for B's scan
    args[which] = bad
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError, match=message) as err:
        ct_pair.prepare(args["fixed"], args["moving"], str(out), fixed_label=args["fixed_label"])
    assert bad in str(err.value)  # names the file
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # and the command line says it as one line, exit code 2
    cli = ["prepare", "--fixed", args["fixed"], "--moving", args["moving"], "--out_dir", str(out)]
    if args["fixed_label"]:
        cli += ["--fixed_label", args["fixed_label"]]
    proc = ct_pair_cli(*cli)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_ct_overlay_refuses_images_without_hu(tmp_path, untrained_ckpt):
    data = tmp_path / "CTPair"
    (data / "imagesTr").mkdir(parents=True)
    img = nib.load(A_CT)
    arr = np.asarray(img.dataobj)[:96, :96, :96]
    nib.save(nib.Nifti1Image(arr.astype(np.int16), img.affine), data / "imagesTr" / "CTPair_0001_0000.nii.gz")
    nib.save(nib.Nifti1Image((arr + 1024).astype(np.uint16), img.affine), data / "imagesTr" / "CTPair_0002_0000.nii.gz")
    pair = {"fixed": "./imagesTr/CTPair_0001_0000.nii.gz", "moving": "./imagesTr/CTPair_0002_0000.nii.gz"}
    index = {"training": [{"image": pair["fixed"]}, {"image": pair["moving"]}], "registration_val": [pair]}
    (data / "CTPair_dataset.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    proc = bundle("--dataset_dir", str(data), "--output_dir", str(out), "--ckpt_path", str(untrained_ckpt), *TINY,
                  configs=OVERLAY)  # fmt: skip
    assert proc.returncode != 0
    assert "CTPair_0002_0000.nii.gz" in proc.stderr and "Hounsfield" in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- refused through the command line
@pytest.fixture(scope="session")  # cheap: built in each worker, not grouped
def shared_inputs():
    """The fingerprint of the shared scans, compared after every refusal: inputs are only read."""
    return fingerprint(A_CT, A_LAB, B_DICOM, B_LAB)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--spacing", "0"], "spacing must be a number of millimetres in (0, 10], got 0.0"),
        (["--spacing", "-2"], "spacing must be a number of millimetres in (0, 10], got -2.0"),
        (["--spacing", "nan"], "got nan"),
        (["--spacing", "1000"], "got 1000.0"),
        (["--size", "0", "0", "0"], "grid size must be 3 positive multiples of 16, got [0, 0, 0]"),
    ],
    ids=["spacing-0", "spacing-negative", "spacing-nan", "spacing-absurd", "size-0"],
)
def test_unusable_grid_arguments_are_refused(tmp_path, shared_inputs, args, message):
    out = tmp_path / "prepared"
    proc = ct_pair_cli("prepare", "--fixed", A_CT, "--moving", A_CT, "--out_dir", out, *args)
    assert_refused(proc, out, message=message)  # before ITK's own "spacing" exception, or a division by zero
    assert fingerprint(A_CT, A_LAB, B_DICOM, B_LAB) == shared_inputs


def test_a_grid_beyond_the_voxel_maximum_is_refused_before_resampling(tmp_path, shared_inputs):
    # 0.3 mm around A: before this check, resampling onto it grew past 8 GB of memory within 37 s
    out = tmp_path / "prepared"
    proc = ct_pair_cli("prepare", "--fixed", A_CT, "--moving", A_CT, "--out_dir", out, "--spacing", "0.3")
    assert_refused(proc, out, A_CT, "1216 x 1008 x 1120 voxels", "needs 32.9 GB",
                   message="is more than the maximum of 67,108,864 voxels")  # fmt: skip
    assert fingerprint(A_CT, A_LAB, B_DICOM, B_LAB) == shared_inputs


def test_a_grid_beyond_the_memory_left_is_refused_before_resampling(tmp_path, shared_inputs):
    # 400^3 voxels is under the voxel maximum, but the pair as the network reads it needs
    # 400^3 x 24 bytes = 1.54 GB, more than a 2 GiB address space leaves once ITK is loaded (one
    # thread, one malloc arena: about 1.1 GiB)
    out = tmp_path / "prepared"
    single = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    proc = ct_pair_cli("prepare", "--fixed", A_CT, "--moving", A_CT, "--out_dir", out, "--size", "400", "400", "400",
                       ulimit=f"-v {2 * 1024 * 1024}", env=single)  # fmt: skip
    assert_refused(proc, out, A_CT, "400 x 400 x 400 voxels", "needs 1.54 GB",
                   message="left under this process's address-space limit (ulimit -v 2097152)")  # fmt: skip
    assert fingerprint(A_CT, A_LAB, B_DICOM, B_LAB) == shared_inputs


def _slice_position(path) -> float:
    """ImagePositionPatient z (B's slices are axial) of one DICOM file, in mm."""
    io = itk.GDCMImageIO.New()
    io.SetFileName(str(path))
    io.ReadImageInformation()
    return io.GetOrigin(2)


@pytest.mark.parametrize("defect", ["missing-slice", "duplicate-slice"])
def test_dicom_series_with_a_missing_or_duplicated_slice_is_refused(tmp_path, shared_inputs, defect):
    folder = tmp_path / "dicom"
    shutil.copytree(B_DICOM, folder)  # the shared series is never modified
    by_position = sorted(folder.iterdir(), key=_slice_position)
    middle = by_position[10]
    z = _slice_position(middle)
    if defect == "missing-slice":
        middle.unlink()  # neighbours 2 mm away on each side: a 4 mm gap
        names = [f"{z - 2:g} and {z + 2:g} mm", "are 4 mm apart where the series' spacing is 2 mm"]
        message = "a slice is missing"
    else:
        shutil.copy(middle, folder / "copy_of_a_slice")
        names, message = [f"({z:g} mm", middle.name, "copy_of_a_slice"], "slices at the same position"
    before = fingerprint(folder)
    out = tmp_path / "prepared"
    proc = ct_pair_cli("prepare", "--fixed", folder, "--moving", A_CT, "--out_dir", out)
    assert_refused(proc, out, folder, *names, message=message)  # instead of ITK's warning and a wrong geometry
    assert fingerprint(folder) == before and fingerprint(A_CT, A_LAB, B_DICOM, B_LAB) == shared_inputs


@pytest.mark.parametrize("command", ["prepare", "restore"])
def test_unusable_output_folder_is_refused_before_any_reading(tmp_path, command):
    # the inputs do not exist: a message about the output proves it was checked first
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "result"
    missing = tmp_path / "missing"
    if command == "prepare":
        args = ["--fixed", missing, "--moving", missing]
    else:
        args = ["--prepared_dir", missing, "--disp_dir", missing]
    proc = ct_pair_cli(command, *args, "--out_dir", out)
    assert_refused(proc, out, out, message=f"cannot be created: {tmp_path / 'a_file'} is a file")
    # an existing, non-empty output folder is left as it is
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "earlier.txt").write_text("earlier results")
    proc = ct_pair_cli(command, *args, "--out_dir", taken)
    assert proc.returncode == 2 and f"output folder {taken} already exists and is not empty" in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["earlier.txt"]
    assert (taken / "earlier.txt").read_text() == "earlier results"


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    """Subject A against itself on a 32^3 grid at 4 mm (no pre-alignment), and a registration
    folder holding a zero displacement file of that grid: the restore tests start from them."""
    tmp = tmp_path_factory.mktemp("small")
    prepared, registered = tmp / "prepared", tmp / "registered"
    proc = ct_pair_cli("prepare", "--fixed", A_CT, "--moving", A_CT, "--out_dir", prepared, "--size", "32", "32", "32",
                       "--spacing", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    registered.mkdir()
    affine = nib.load(prepared / "imagesTr" / "CTPair_0001_0000.nii.gz").affine
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32, 3), np.float32), affine), registered / DISP)
    return prepared, registered


def test_restore_applies_a_known_shift(tmp_path, small_prepared):
    # a constant field of 0.75 voxels (3 mm, one voxel of A) along the prepared grid's first axis (R):
    # pulled back onto A's own grid, the warped scan is A one voxel further right wherever the
    # prepared grid (A's centre +- 62 mm) has the field, and displacement_mm is 3 mm towards R
    prepared, zero = small_prepared
    registered = tmp_path / "registered"
    registered.mkdir()
    img = nib.load(zero / DISP)
    field = np.zeros(img.shape, np.float32)
    field[..., 0] = 0.75
    nib.save(nib.Nifti1Image(field, img.affine), registered / DISP)
    out = tmp_path / "result"
    proc = ct_pair_cli("restore", "--prepared_dir", prepared, "--disp_dir", registered, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = np.asarray(nib.load(A_CT).dataobj)  # stored RAS: array axis 0 points to the right
    warped = np.asarray(nib.load(out / "warped_moving.nii.gz").dataobj)
    inner = (slice(46, 76), slice(35, 66), slice(41, 71))  # A's centre voxel (60.5, 50, 55.5) +- 45 mm
    assert np.abs(warped[inner] - a[46 + 1 : 76 + 1, 35:66, 41:71]).max() < 0.01
    disp = itk.array_from_image(itk.imread(str(out / "displacement_mm.nii.gz")))  # (z, y, x, 3), LPS mm
    assert np.allclose(disp[41:71, 35:66, 46:76], [-3.0, 0.0, 0.0], atol=1e-4)  # R is -x in LPS


@pytest.mark.parametrize(
    "values, message",
    [
        ({(1, 2, 3, 0): np.nan, (4, 5, 6, 2): np.inf}, "displacement field has 2 NaN or infinite values"),
        # finite in the file, but 3e38 voxels of 4 mm leave float32: displacement_mm would hold Inf
        ({(16, 16, 16, 0): 3e38}, "displacement_mm.nii.gz would hold NaN or infinite values"),
    ],
    ids=["nan-and-inf", "beyond-float32"],
)
def test_restore_refuses_a_field_giving_non_finite_outputs(tmp_path, small_prepared, shared_inputs, values, message):
    prepared, zero = small_prepared
    registered = tmp_path / "registered"
    shutil.copytree(zero, registered)
    disp = registered / DISP
    img = nib.load(disp)
    field = np.asarray(img.dataobj).copy()
    for index, value in values.items():
        field[index] = value
    nib.save(nib.Nifti1Image(field, img.affine), disp)
    before = fingerprint(prepared, registered)
    out = tmp_path / "result"
    proc = ct_pair_cli("restore", "--prepared_dir", prepared, "--disp_dir", registered, "--out_dir", out)
    assert_refused(proc, out, disp, message=message)
    assert fingerprint(prepared, registered) == before
    assert fingerprint(A_CT, A_LAB, B_DICOM, B_LAB) == shared_inputs


@pytest.mark.parametrize("command", ["prepare", "restore"])
def test_a_full_disk_is_reported_naming_the_output_file(tmp_path, small_prepared, command):
    # a 16 KiB file size limit (bash ulimit -f) fails the first image write as a full disk does;
    # ITK's NIfTI writer alone would report it only on stderr and leave a truncated file
    out = tmp_path / "result"
    if command == "prepare":
        args = ["--fixed", A_CT, "--moving", A_CT, "--size", "32", "32", "32", "--spacing", "4"]
        first = "imagesTr/CTPair_0001_0000.nii.gz"
    else:
        args, first = ["--prepared_dir", small_prepared[0], "--disp_dir", small_prepared[1]], "warped_moving.nii.gz"
    proc = ct_pair_cli(command, *args, "--out_dir", out, ulimit="-f 16")
    # niftilib prints its own "** ERROR: NWAD" line before the error
    assert_refused(proc, out, f"cannot write {out / first}", message="written incompletely", one_line=False)
