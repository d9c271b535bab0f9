"""Partially-labelled cohorts (issue 5): cohort declarations and their errors, label mapping
(including KiTS-style kidneys split by side, on a real CT), the partial-label Dice loss (an organ a
cohort does not annotate contributes nothing), ground truth kept in pseudo-labels, pairs drawn
within a cohort."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CT
from monai.transforms import EnsureChannelFirstd, LoadImaged

from scripts import cohorts as C
from scripts.data import RandomPairDataset
from tests.test_bundle import SAMPLE

A_CT, A_LAB = CT / "subject_a" / "ct.nii.gz", CT / "subject_a" / "labels_l2r.nii.gz"
A_IDS = {"1": "spleen", "2": "right_kidney", "3": "left_kidney", "4": "gallbladder", "6": "liver", "7": "stomach",
         "8": "aorta", "9": "ivc", "10": "portal_vein", "11": "pancreas", "12": None, "13": None}  # fmt: skip
needs_ct = pytest.mark.skipif(not CT.is_dir(), reason=f"needs {CT} (BUNDLE_TEST_DATA)")
ORGAN = {o: i + 1 for i, o in enumerate(C.ORGANS)}


def cohort(labels, data=None, **kw):
    return {"name": "a", "data": data or [{"image": str(A_CT), "label": str(A_LAB)}], "labels": labels, **kw}


# --------------------------------------------------------------------------- declarations
@pytest.mark.parametrize(
    "spec, message",
    [
        (cohort({"1": "lung"}), "unknown organ 'lung'"),
        (cohort({"1": "spleen"}, annotated=["spleen", "brain"]), "unknown organs ['brain']"),
        (cohort({"1": "spleen"}, annotated=["spleen", "liver"]), "declares ['liver'] annotated but no label id maps"),
        (cohort({"one": "spleen"}), "label id 'one' is not an integer"),
        (cohort({"0": "spleen"}), "ids start at 1"),
        ({"name": "a"}, "needs a 'name' and 'data'"),
        (cohort({"1": "spleen"}, organs=["x"]), "unknown keys ['organs']"),
    ],
)
def test_bad_cohort_declarations_are_refused(spec, message):
    with pytest.raises(C.CohortError, match=None) as e:
        C.load_cohorts([spec])
    assert message in str(e.value) and "'a'" in str(e.value) if "name" in spec else message in str(e.value)


def test_cohort_list_errors(tmp_path):
    with pytest.raises(C.CohortError, match="no cohorts given"):
        C.load_cohorts("")
    with pytest.raises(C.CohortError, match="two cohorts are named 'a'"):
        C.load_cohorts([cohort({"1": "spleen"}), cohort({"1": "spleen"})])
    bad = tmp_path / "c.json"
    bad.write_text("[{")
    with pytest.raises(C.CohortError, match=str(bad)):
        C.load_cohorts(str(bad))


def test_lut_mask_and_relative_paths(tmp_path):
    (tmp_path / "d").mkdir()
    path = tmp_path / "cohorts.json"
    path.write_text(json.dumps([{"name": "kits", "data": "d", "labels": {"1": "kidney_by_side", "2": None}}]))
    (c,) = C.load_cohorts(str(path))
    assert c["data"] == str(tmp_path / "d")
    assert c["annotated"] == ["right_kidney", "left_kidney"]
    assert c["lut"].tolist() == [0, -1, 0]
    assert np.flatnonzero(c["mask"]).tolist() == [ORGAN["right_kidney"], ORGAN["left_kidney"]]
    (ct,) = C.load_cohorts([cohort(C.ABDOMENCTCT_LABELS)])
    assert ct["mask"].sum() == 11 and ct["mask"][0] == 0  # all 11 organs, adrenal glands dropped


@needs_ct
def test_label_ids_checked_against_the_data(tmp_path):
    (ok,) = C.load_cohorts([cohort(A_IDS)])
    C.check_label_ids(ok, C.cohort_cases(ok))
    (absent,) = C.load_cohorts([cohort({**A_IDS, "5": "oesophagus", "99": "liver"})])
    with pytest.raises(C.CohortError, match=r"cohort 'a': label ids \[5, 99\] of its mapping occur in none"):
        C.check_label_ids(absent, C.cohort_cases(absent))
    undeclared = {k: v for k, v in A_IDS.items() if k not in ("12", "13")}
    (partial,) = C.load_cohorts([cohort(undeclared)])
    with pytest.raises(C.CohortError, match=rf"{A_LAB}: label ids \[12, 13\] are not in the mapping of cohort 'a'"):
        C.check_label_ids(partial, C.cohort_cases(partial))
    (missing,) = C.load_cohorts([cohort(A_IDS, data=[{"image": str(tmp_path / "nope.nii.gz")}])])
    with pytest.raises(C.CohortError, match="nope.nii.gz does not exist"):
        C.cohort_cases(missing)


@needs_ct
def test_mapping_and_kidneys_split_by_side_on_a_real_ct():
    """KiTS labels both kidneys with one id: merge A's two kidney ids into one and split them back
    by side; the right kidney must come back as A's right kidney (RAS: patient's right is +x)."""
    (both,) = C.load_cohorts([cohort({**A_IDS, "2": "kidney_by_side", "3": "kidney_by_side"})])
    (case,) = C.cohort_cases(both)
    d = EnsureChannelFirstd(["image", "label"])(LoadImaged(["image", "label"], image_only=True)(case))
    mapped = C.MapCohortLabelsd("label")(d)["label"][0].numpy()
    truth = np.asarray(nib.load(str(A_LAB)).dataobj)
    for organ, file_id in (("right_kidney", 2), ("left_kidney", 3)):
        a, b = mapped == ORGAN[organ], truth == file_id
        assert b.sum() > 1000
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99, organ
    assert ((mapped == ORGAN["liver"]) == (truth == 6)).all()
    assert not (mapped[(truth == 12) | (truth == 13)]).any()  # dropped ids become background
    assert set(np.unique(mapped)) <= set(range(C.NUM_CLASSES))


# --------------------------------------------------------------------------- pseudo-labels
def test_keep_ground_truth():
    pred = torch.tensor([[[[0, 4, 4, 1, 5, 2]]]], dtype=torch.float32)  # (1, 1, 1, 6)
    gt = torch.tensor([[[[4, 4, 0, 0, 0, 3]]]], dtype=torch.float32)
    mask = np.zeros(C.NUM_CLASSES, np.float32)
    mask[[3, 4]] = 1  # the cohort annotates left kidney and liver
    out = C.KeepGroundTruthd("pred")({"pred": pred, "label": gt, "mask": mask})["pred"]
    # liver only where the ground truth has it; spleen (not annotated) predicted where GT is empty.
    assert out.flatten().tolist() == [4, 4, 0, 1, 5, 3]
    unlabelled = C.KeepGroundTruthd("pred")({"pred": pred})["pred"]
    assert torch.equal(unlabelled, pred)


def test_output_paths_do_not_collide(tmp_path):
    cases = [{"image": "/d/case_0/imaging.nii.gz"}, {"image": "/d/case_1/imaging.nii.gz"}]
    root = C.output_root(cases)
    paths = {C.pseudo_label_path(c["image"], str(tmp_path), root) for c in cases}
    assert paths == {str(tmp_path / "case_0" / "imaging_seg.nii.gz"), str(tmp_path / "case_1" / "imaging_seg.nii.gz")}
    with pytest.raises(C.CohortError, match="listed 2 times"):
        C.output_root(cases + cases[:1])


def test_a_failed_seg_inference_leaves_no_label_maps(tmp_path):
    """run_staged: an ignite run that writes the first case's map and fails on the second leaves
    neither the staging folder nor the output folder; the success path renames one into the other."""
    from ignite.engine import Engine

    cases = [{"image": f"/d/case_{i}/imaging.nii.gz", "cohort": "k"} for i in range(2)]
    root = C.output_root(cases)
    out = tmp_path / "pseudo"
    staging = C.staging_dir(str(out))

    class Inference:  # an ignite run over the cases, as seg_inference.json's evaluator.run()
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def step(self, engine, case):
            if self.fail and engine.state.iteration == 2:
                raise RuntimeError("out of memory on case 2")
            path = C.pseudo_label_path(case["image"], staging, root)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()

        def run(self):
            Engine(self.step).run(cases, max_epochs=1)

    with pytest.raises(RuntimeError, match="case 2"):
        C.run_staged(Inference(True), cases, str(out), staging)
    assert not os.path.exists(staging) and not out.exists()

    index = C.run_staged(Inference(False), cases, str(out), staging)
    assert index == str(out / "cohorts.json") and not os.path.exists(staging)
    listed = json.loads((out / "dataset.json").read_text())["training"]
    assert [e["label"] for e in listed] == [str(out / f"case_{i}" / "imaging_seg.nii.gz") for i in range(2)]
    assert all(os.path.isfile(e["label"]) for e in listed)
    with pytest.raises(C.CohortError, match="already exists and is not empty"):
        C.staging_dir(str(out))


# --------------------------------------------------------------------------- pretraining pairs
def test_pairs_drawn_within_a_cohort():
    cases = [{"image": torch.full((1, 2, 2, 2), float(i)), "cohort": "ab"[i % 2]} for i in range(6)]
    ds = RandomPairDataset(cases, group_key="cohort").set_random_state(0)
    seen = set()
    for _ in range(20):
        for i in range(6):
            pair = ds[i]
            m, f = (int(pair["moving_image"].flatten()[0]), int(pair["fixed_image"].flatten()[0]))
            assert m == i and f != m and f % 2 == m % 2
            seen.add((m, f))
    assert len(seen) == 12  # every within-cohort pair occurs
    with pytest.raises(ValueError, match=r"\['c'\] have a single case"):
        RandomPairDataset([*cases, {"image": cases[0]["image"], "cohort": "c"}], group_key="cohort")


@needs_ct
def test_cohorts_without_annotated_organs_are_not_trained_on():
    to_label = {"name": "unlabelled", "data": [{"image": str(A_CT)}]}
    cases = C.segmentation_cases([cohort(A_IDS), to_label], annotated_only=True)
    assert [c["cohort"] for c in cases] == ["a"]
    assert len(C.segmentation_cases([cohort(A_IDS), to_label])) == 2  # inference labels both
    with pytest.raises(C.CohortError, match="no cohort annotates any organ"):
        C.segmentation_cases([to_label], annotated_only=True)


def test_learn2reg_validation_cases_never_used(tmp_path):
    """Pretraining or pseudo-labels built from a Learn2Reg folder's validation scans would leak into
    the validation of the fine-tuned model: they are left out for every use, whether the cohort
    names the folder or its dataset JSON."""
    index = json.loads((SAMPLE / "HippocampusMR_dataset.json").read_text())
    for e in index["training"]:
        e.update({k: str(SAMPLE / e[k]) for k in ("image", "label")})
    val = index["registration_val"][0]
    index["registration_val"] = [{k: str(SAMPLE / val[k]) for k in ("fixed", "moving")}]
    (tmp_path / "HippocampusMR_dataset.json").write_text(json.dumps(index))
    held_out = {str((SAMPLE / val["fixed"]).resolve()), str((SAMPLE / val["moving"]).resolve())}
    for data in (str(tmp_path), str(tmp_path / "HippocampusMR_dataset.json")):
        (c,) = C.load_cohorts([{"name": "l2r", "data": data}])
        for exclude in (False, True):
            images = {case["image"] for case in C.cohort_cases(c, exclude_val=exclude)}
            assert len(images) == 6 and not images & held_out, (data, exclude)
