"""scripts/prepare_cohorts.py on the two real CTs of the abdomen_ct_samples test data (conftest.CT) (subject A:
NIfTI, 3 mm; subject B: a DICOM series with a label file stored in another orientation): two
cohorts on one 2 mm grid around a reference scan, translation recovery on a shifted copy of A, and
bad cohort declarations refused before anything is written, and the output folder written whole,
with normal permissions, replaced only once the new one is complete."""

import json
import shutil
import sys

import forkserver
import itk
import nibabel as nib
import numpy as np
import pytest

from scripts import ct_pair, prepare_cohorts
from scripts.cohorts import ABDOMENCTCT_LABELS, check_label_ids, cohort_cases, load_cohorts
from tests.test_bundle import ROOT
from tests.test_ct import A_CT, A_LAB, B_DICOM, B_LAB, CT, LIVER, UMASK, assert_normal_permissions, fingerprint

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CT.is_dir(), reason=f"needs {CT} (BUNDLE_TEST_DATA)")]

A_IDS = {1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13}  # no 5 (oesophagus) in subject A's label map
B_IDS = {1, 6, 7, 8, 9, 10, 11, 12}
A_LABELS = {k: v for k, v in ABDOMENCTCT_LABELS.items() if int(k) in A_IDS} | {"4": None}
B_LABELS = {k: v for k, v in ABDOMENCTCT_LABELS.items() if int(k) in B_IDS}
SIZE = ["--size", "96", "96", "96"]
SHIFT_MM = 20.0  # NIfTI (RAS) x of the shifted copy of A
CROP = 8  # top slices removed from the shifted copy: its centre moves 12 mm, the anatomy does not


def cli(*args, ulimit: str | None = None):
    """``python -m scripts.prepare_cohorts ARGS`` under ``UMASK`` and, with ``ulimit``, that bash limit."""
    cmd = [sys.executable, "-m", "scripts.prepare_cohorts", *map(str, args)]
    if ulimit:
        cmd = ["bash", "-c", f'ulimit {ulimit} && exec "$@"', "bash", *cmd]
    return forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, umask=UMASK)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def cohort(name, image, label=None, labels=None, **extra):
    entry = {"image": str(image), **({"label": str(label)} if label else {})}
    return {"name": name, "data": [entry], **({"labels": labels} if labels is not None else {}), **extra}


def write_cohorts(path, cohorts):
    path.write_text(json.dumps(cohorts))
    return path


def load(path):
    return np.asarray(nib.load(path).dataobj)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def centre(image):
    return ct_pair._corners(image).mean(0)


# --------------------------------------------------------------------------- two cohorts, one grid
@pytest.fixture(scope="module")
def two_cohorts(tmp_path_factory):
    """Cohort a (subject A, NIfTI) and cohort b (subject B, DICOM), reference A, centre alignment
    (scanner coordinates of the two patients do not overlap: --align none refuses B, see below)."""
    tmp = tmp_path_factory.mktemp("two")
    spec = [cohort("a", A_CT, A_LAB, A_LABELS), cohort("b", B_DICOM, B_LAB, B_LABELS, annotated=["liver", "spleen"])]
    cohorts = write_cohorts(tmp / "cohorts.json", spec)
    inputs = [A_CT, A_LAB, B_DICOM, B_LAB]
    before = fingerprint(*inputs)
    out = tmp / "prepared"
    proc = ok(cli("--cohorts", cohorts, "--reference", A_CT, "--out_dir", out, "--align", "center", *SIZE))
    return {"out": out, "spec": spec, "proc": proc, "before": before, "after": fingerprint(*inputs)}


def test_two_cohorts_land_on_one_grid_with_their_own_label_ids(two_cohorts):
    out, proc = two_cohorts["out"], two_cohorts["proc"]
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[")] == [
        "[1/2] a ct",
        "[2/2] b dicom",
    ]
    assert two_cohorts["after"] == two_cohorts["before"]  # inputs only read
    assert_normal_permissions(out)  # the published staging folder too, not mkdtemp's 0o700
    # the prepared cohort list is usable as it is, relative paths resolved against its folder
    cohorts = load_cohorts(str(out / "cohorts.json"))
    assert [c["data"] for c in cohorts] == [str(out / "a" / "dataset.json"), str(out / "b" / "dataset.json")]
    declared = json.loads((out / "cohorts.json").read_text())
    assert [{k: c[k] for k in c if k != "data"} for c in declared] == [
        {k: c[k] for k in c if k != "data"} for c in two_cohorts["spec"]
    ]  # names, labels, annotated as declared
    assert cohorts[1]["annotated"] == ["liver", "spleen"]
    reference = ct_pair.read_image(str(A_CT))
    affines = []
    for c, source, source_label, ids in zip(cohorts, (A_CT, B_DICOM), (A_LAB, B_LAB), (A_IDS, B_IDS), strict=True):
        cases = cohort_cases(c)
        assert len(cases) == 1 and {"image", "label"} <= set(cases[0])
        index = json.loads((out / c["name"] / "dataset.json").read_text())
        assert index["reference"] == str(A_CT) and index["align"] == "center" and index["spacing"] == 2.0
        entry = index["training"][0]
        assert entry["source_image"] == str(source) and entry["source_label"] == str(source_label)
        image, label = nib.load(cases[0]["image"]), nib.load(cases[0]["label"])
        assert image.shape == label.shape == (96, 96, 96)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S") and np.allclose(np.diag(image.affine)[:3], 2.0)
        assert np.allclose(image.affine, label.affine)
        affines.append(image.affine)
        hu, lab = load(cases[0]["image"]), load(cases[0]["label"])
        found = set(np.unique(lab).tolist()) - {0}
        assert LIVER in found and found <= ids  # the file's own ids (liver is organ 4 after the mapping)
        assert 0 < hu[lab == LIVER].mean() < 150  # image and label resampled the same way
        if c["name"] == "b":  # a 40 mm slab in a 192 mm grid: air (-1024 HU) outside the scan
            assert (hu[:, :, 0] == ct_pair.AIR_HU).all() and (hu[:, :, -1] == ct_pair.AIR_HU).all()
        # centre alignment: the transform maps the reference's centre onto the scan's centre
        transform = itk.transformread(str(out / c["name"] / entry["transform"]))[0]
        scan = ct_pair.read_image(str(source))
        assert np.allclose(transform.TransformPoint([float(x) for x in centre(reference)]), centre(scan), atol=1e-3)
    assert np.allclose(affines[0], affines[1])  # one grid for every cohort


def test_prepared_cohorts_pass_the_label_checks_when_the_grid_covers_the_organs(two_cohorts):
    """A 96^3 grid crops organs of A; check_label_ids on the output then refuses A's cohort and the
    tool warned about it. B (a 4 cm slab) lies inside the grid: its prepared cohort passes."""
    out, proc = two_cohorts["out"], two_cohorts["proc"]
    a, b = load_cohorts(str(out / "cohorts.json"))
    check_label_ids(b, cohort_cases(b))
    missing = sorted(A_IDS - set(np.unique(load(out / "a" / "labelsTr" / "ct.nii.gz")).tolist()))
    assert missing and f"label ids {missing}" in proc.stderr
    with pytest.raises(ValueError, match=r"occur in none"):
        check_label_ids(a, cohort_cases(a))


# --------------------------------------------------------------------------- translation
@pytest.fixture(scope="module")
def translated(tmp_path_factory):
    """Cohort a: subject A; cohort shifted: A's image and label with the NIfTI origin moved by
    +20 mm in x and the top 8 slices cropped (so the image centres differ from the true shift by
    12 mm: the registration, not the centre start, has to find it). Reference A, --align translation."""
    tmp = tmp_path_factory.mktemp("translation")
    (tmp / "shifted").mkdir()
    for src, dst in ((A_CT, tmp / "shifted" / "a_shifted.nii.gz"), (A_LAB, tmp / "shifted" / "a_shifted_label.nii.gz")):
        img = nib.load(src)
        affine = img.affine.copy()
        affine[0, 3] += SHIFT_MM
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-CROP], affine, img.header), dst)
    spec = [
        cohort("a", A_CT, A_LAB, A_LABELS),
        cohort("shifted", tmp / "shifted" / "a_shifted.nii.gz", tmp / "shifted" / "a_shifted_label.nii.gz", A_LABELS),
    ]
    out = tmp / "prepared"
    ok(cli("--cohorts", write_cohorts(tmp / "cohorts.json", spec), "--reference", A_CT, "--out_dir", out,
           "--align", "translation", *SIZE))  # fmt: skip
    return {"out": out, "shifted": tmp / "shifted" / "a_shifted.nii.gz"}


def _translation(out, cohort_name, case):
    """Translation (LPS mm) of the saved transform at the reference's centre, and the transform."""
    transform = itk.transformread(str(out / cohort_name / "transforms" / f"{case}.tfm"))[0]
    c = centre(ct_pair.read_image(str(A_CT)))
    return np.array(transform.TransformPoint([float(x) for x in c])) - c, transform


def test_translation_of_a_scan_onto_itself_is_the_identity(translated):
    out = translated["out"]
    shift, transform = _translation(out, "a", "ct")
    assert np.linalg.norm(shift) < 3.0
    assert np.allclose(itk.array_from_matrix(transform.GetMatrix()), np.eye(3))  # a translation only
    hu, lab = load(out / "a" / "imagesTr" / "ct.nii.gz"), load(out / "a" / "labelsTr" / "ct.nii.gz")
    assert 0 < hu[lab == LIVER].mean() < 150  # soft tissue: image and label resampled consistently


def test_translation_recovers_a_known_shift(translated):
    out = translated["out"]
    shift, _ = _translation(out, "shifted", "a_shifted")
    # +20 mm in NIfTI (RAS) x is -20 mm in ITK's LPS x: the reference point p is at p + (-20, 0, 0) in the copy
    expected = np.array([-SHIFT_MM, 0.0, 0.0])
    start = centre(ct_pair.read_image(str(translated["shifted"]))) - centre(ct_pair.read_image(str(A_CT)))
    assert np.linalg.norm(start - expected) > 10  # the centre start alone is wrong by the crop
    assert np.linalg.norm(shift - expected) < 4.0, shift
    moved = load(out / "shifted" / "labelsTr" / "a_shifted.nii.gz") == LIVER
    unshifted = load(out / "a" / "labelsTr" / "ct.nii.gz") == LIVER
    assert moved.sum() > 1000 and dice(moved, unshifted) > 0.85


# --------------------------------------------------------------------------- bad input
def _unknown_organ(tmp):
    return [cohort("a", A_CT, A_LAB, A_LABELS | {"7": "lung"})], "unknown organ 'lung'", "cohorts.json"


def _absent_id(tmp):
    return (
        [cohort("a", A_CT, A_LAB, A_LABELS | {"99": "liver"})],
        "label ids [99] of its mapping occur in none",
        "cohort 'a'",
    )


def _undeclared_id(tmp):
    labels = {k: v for k, v in A_LABELS.items() if k != "13"}
    return [cohort("a", A_CT, A_LAB, labels)], "label ids [13] are not in the mapping", str(A_LAB)


def _missing_image(tmp):
    missing = tmp / "missing" / "ct.nii.gz"
    return [cohort("a", A_CT, A_LAB, A_LABELS), cohort("b", missing)], "does not exist", str(missing)


def _duplicate_case(tmp):
    (tmp / "copy").mkdir()
    shutil.copy(A_CT, tmp / "copy" / "ct.nii.gz")
    spec = cohort("a", A_CT, labels={})
    spec["data"].append({"image": str(tmp / "copy" / "ct.nii.gz")})
    return [spec], "both give the case name 'ct'", str(tmp / "copy" / "ct.nii.gz")


def _no_overlap(tmp):
    # scanner coordinates: B (z -805..-766 mm) and A (z 94..427 mm) share no voxel
    return [cohort("a", A_CT), cohort("b", B_DICOM)], "does not overlap the reference scan", str(B_DICOM)


@pytest.mark.parametrize(
    "make",
    [_unknown_organ, _absent_id, _undeclared_id, _missing_image, _duplicate_case, _no_overlap],
    ids=[
        "unknown-organ",
        "absent-label-id",
        "undeclared-label-id",
        "missing-image",
        "duplicate-case-name",
        "no-overlap",
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, make):
    spec, message, names = make(tmp_path)
    cohorts = write_cohorts(tmp_path / "cohorts.json", spec)
    out = tmp_path / "out" / "prepared"
    proc = cli("--cohorts", cohorts, "--reference", A_CT, "--out_dir", out, "--align", "none", *SIZE)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0] and names in lines[0]
    assert not (tmp_path / "out").exists()  # nothing, not even a temporary folder


def test_existing_output_is_refused_or_replaced_whole(tmp_path):
    cohorts = write_cohorts(tmp_path / "cohorts.json", [cohort("a", A_CT, A_LAB, A_LABELS)])
    out = tmp_path / "out" / "prepared"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("earlier run")
    args = ["--cohorts", cohorts, "--reference", A_CT, "--out_dir", out, "--align", "center", *SIZE]
    proc = cli(*args)
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert prepare_cohorts.main([*map(str, args), "--overwrite"]) == 0  # in-process: no second interpreter start
    assert sorted(p.name for p in out.iterdir()) == ["a", "cohorts.json"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["prepared"]  # no temporary folder left


@pytest.mark.parametrize(
    "args, message",
    [(["--spacing", "0"], "spacing must be a number of millimetres in (0, 10], got 0.0"),
     (["--spacing", "0.3"], "is more than the maximum of 67,108,864 voxels")],
    ids=["spacing-0", "grid-too-large"],
)  # fmt: skip
def test_unusable_grid_is_refused_before_anything_is_written(tmp_path, args, message):
    cohorts = write_cohorts(tmp_path / "cohorts.json", [cohort("a", A_CT, A_LAB, A_LABELS)])
    out = tmp_path / "out" / "prepared"
    proc = cli("--cohorts", cohorts, "--reference", A_CT, "--out_dir", out, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_overwrite_leaves_the_old_folder_whole(tmp_path):
    # a 16 KiB file size limit fails the first image write as a full disk does: the old results stay
    cohorts = write_cohorts(tmp_path / "cohorts.json", [cohort("a", A_CT, A_LAB, A_LABELS)])
    out = tmp_path / "out" / "prepared"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("earlier run")
    proc = cli("--cohorts", cohorts, "--reference", A_CT, "--out_dir", out, "--align", "center", *SIZE, "--overwrite",
               ulimit="-f 16")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # after niftilib's own "** ERROR: NWAD" line
    assert last.startswith(f"error: cannot write {out / 'a' / 'imagesTr' / 'ct.nii.gz'}: written incompletely"), last
    assert "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "earlier run"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["prepared"]  # no staging folder left
