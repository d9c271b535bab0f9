"""Abdominal CT task on the two real CTs of ../shared/data/abdomen_ct_samples (subject A: NIfTI,
3 mm; subject B: a DICOM series whose label file is stored in another orientation): reading,
labels on the right anatomy, the CT overlay for train / inference / evaluate, the prepare ->
register -> restore path back to the fixed scan's own grid, and bad input."""

import json
import shutil
import subprocess
import sys

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from scripts import ct_pair
from scripts.learn2reg import DatasetError
from scripts.networks import SpatialGradientRegNet
from tests.test_bundle import ROOT, TINY, bundle, ok

CT = ROOT.parent / "shared" / "data" / "abdomen_ct_samples"
A_CT, A_LAB = CT / "subject_a" / "ct.nii.gz", CT / "subject_a" / "labels_l2r.nii.gz"
B_DICOM, B_LAB = CT / "subject_b" / "dicom", CT / "subject_b" / "labels_l2r.nii.gz"
OVERLAY = ("inference", "abdomen_ct")
LIVER, AORTA = 6, 8

pytestmark = pytest.mark.skipif(not CT.is_dir(), reason="needs ../shared/data/abdomen_ct_samples")


def ct_pair_cli(*args):
    return subprocess.run([sys.executable, "-m", "scripts.ct_pair", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
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


def test_inference_and_evaluate_with_the_ct_overlay(prepared, untrained_ckpt, tmp_path):
    out = tmp_path / "registered"
    ok(bundle("--dataset_dir", str(prepared), "--output_dir", str(out), "--ckpt_path", str(untrained_ckpt),
              *TINY, configs=OVERLAY))  # fmt: skip
    disp = nib.load(out / "disp_0001_0000_0002_0000.nii.gz")
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
        index["training"].append({"image": f"./imagesTr/CTPair_{new}_0000.nii.gz", "label": f"./labelsTr/CTPair_{new}_0000.nii.gz"})
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
def test_restore_puts_outputs_on_the_fixed_scans_own_grid(prepared, untrained_ckpt, tmp_path):
    reg = tmp_path / "registered"
    ok(bundle("--dataset_dir", str(prepared), "--output_dir", str(reg), "--ckpt_path", str(untrained_ckpt),
              "--figures", "False", *TINY, configs=OVERLAY))  # fmt: skip
    out = tmp_path / "result"
    proc = ct_pair_cli("restore", "--prepared_dir", str(prepared), "--disp_dir", str(reg), "--out_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fixed = ct_pair.read_image(str(B_DICOM))
    for name in ("warped_moving.nii.gz", "warped_moving_label.nii.gz", "displacement_mm.nii.gz"):
        im = itk.imread(str(out / name))
        assert tuple(itk.size(im)) == (512, 512, 20), name
        assert np.allclose(itk.spacing(im), itk.spacing(fixed), atol=1e-4)
        assert np.allclose(itk.origin(im), itk.origin(fixed), atol=1e-3)
        assert np.allclose(itk.array_from_matrix(im.GetDirection()), itk.array_from_matrix(fixed.GetDirection()))
    warped_label = np.asarray(nib.load(out / "warped_moving_label.nii.gz").dataobj)
    assert set(np.unique(warped_label)) <= set(np.unique(np.asarray(nib.load(A_LAB).dataobj)))
    metrics = json.loads((out / "metrics.json").read_text())
    # Dice over the organs present in both the fixed labels and the warped moving labels (B is a 4 cm
    # slab of the upper abdomen; centring a whole-abdomen scan on it overlaps few organs)
    shared = set(map(str, np.unique(np.asarray(nib.load(B_LAB).dataobj)))) & set(map(str, np.unique(warped_label)))
    assert set(metrics["labels_in_both"]) == shared - {"0"} and shared - {"0"}
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
