"""Segmentation network for noisy labels (issue 5) from the command line on the two real CTs, each
its own cohort with a different set of annotated organs: seg_train runs a few steps,
seg_inference writes label maps on each CT's own grid keeping the ground-truth organs, and bad
cohort declarations stop both before anything is written."""

import json
import re

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from scripts import ct_pair
from scripts.cohorts import ORGANS, cohort_cases, load_cohorts
from scripts.weights import load_pretrained
from tests.test_bundle import bundle, ok
from tests.test_cohorts import A_CT, A_IDS, A_LAB, CT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CT.is_dir(), reason=f"needs {CT} (BUNDLE_TEST_DATA)")]
SMALL = ["--seg_channels", "[4, 8, 16, 32, 64]", "--patch_size", "[48, 48, 48]"]
ORGAN = {o: i + 1 for i, o in enumerate(ORGANS)}
A_ANNOTATED = {"1": "spleen", "2": "right_kidney", "3": "left_kidney", "6": "liver"}  # the rest dropped
B_IDS = {
    "1": None,
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "ivc",
    "10": "portal_vein",
    "11": "pancreas",
    "12": None,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Subject B's DICOM series as NIfTI with its label map on the same grid (as
    scripts.prepare_cohorts writes them), and a cohort file: A annotates spleen, kidneys and liver;
    B annotates liver, stomach, aorta, IVC, portal vein and pancreas."""
    tmp = tmp_path_factory.mktemp("seg")
    image = ct_pair.read_image(str(CT / "subject_b" / "dicom"))
    itk.imwrite(image, str(tmp / "b_ct.nii.gz"))
    itk.imwrite(ct_pair.read_label(str(CT / "subject_b" / "labels_l2r.nii.gz"), image), str(tmp / "b_labels.nii.gz"))
    a_labels = {k: A_ANNOTATED.get(k) for k in A_IDS}
    cohorts = [
        {"name": "a", "data": [{"image": str(A_CT), "label": str(A_LAB)}], "labels": a_labels},
        {
            "name": "b",
            "data": [{"image": str(tmp / "b_ct.nii.gz"), "label": str(tmp / "b_labels.nii.gz")}],
            "labels": B_IDS,
        },
    ]
    (tmp / "cohorts.json").write_text(json.dumps(cohorts))
    return tmp


@pytest.fixture(scope="module")
def trained(data):
    # Validation on the same two scans (there are no others), once, after epoch 2.
    proc = ok(bundle("--cohorts", str(data / "cohorts.json"), "--val_cohorts", str(data / "cohorts.json"),
                     "--val_interval", "2", "--ckpt_dir", str(data / "seg"), *SMALL,
                     "--max_epochs", "2", "--num_workers", "0", configs=("seg_train",)))  # fmt: skip
    return data / "seg" / "seg_model.pt", proc


def test_seg_train_few_steps(trained):
    model, proc = trained
    losses = [float(x) for x in re.findall(r"Iter: 1/1 -- loss: ([\d.]+)", proc.stdout + proc.stderr)]
    assert len(losses) == 2 and all(0 < v <= 1 for v in losses)
    dice = re.findall(r"Epoch\[(\d)\] Metrics -- val_mean_dice: ([\d.]+)", proc.stdout + proc.stderr)
    assert [e for e, _ in dice] == ["2"] and 0 <= float(dice[0][1]) <= 1
    assert (model.parent / "seg_model_best.pt").is_file()
    net = UNet(
        3, 1, len(ORGANS) + 1, channels=(4, 8, 16, 32, 64), strides=(2, 2, 2, 2), num_res_units=2, norm="instance"
    )
    load_pretrained(net, str(model))  # every tensor, right shapes: background + 11 organs
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def test_seg_inference_label_maps_on_each_scans_grid(trained, data, tmp_path):
    model, _ = trained
    ok(bundle("--cohorts", str(data / "cohorts.json"), "--ckpt_path", str(model), "--output_dir", str(tmp_path), *SMALL,
              configs=("seg_inference",)))  # fmt: skip
    index = json.loads((tmp_path / "dataset.json").read_text())
    by_cohort = load_cohorts(str(tmp_path / "cohorts.json"))  # ready for pretrain.json --cohorts
    assert [(c["name"], len(cohort_cases(c))) for c in by_cohort] == [("a", 1), ("b", 1)]
    assert [e["image"] for e in index["training"]] == [str(A_CT), str(data / "b_ct.nii.gz")]
    for entry, truth, annotated in (
        (index["training"][0], {ORGAN["liver"]: 6, ORGAN["spleen"]: 1, ORGAN["right_kidney"]: 2}, A_ANNOTATED.values()),
        (
            index["training"][1],
            {ORGAN["liver"]: 6, ORGAN["stomach"]: 7, ORGAN["aorta"]: 8},
            [o for o in B_IDS.values() if o],
        ),
    ):
        image = nib.load(entry["image"])
        gt_file = A_LAB if entry["image"] == str(A_CT) else data / "b_labels.nii.gz"
        gt = np.asarray(nib.load(str(gt_file)).dataobj)
        out = nib.load(entry["label"])
        seg = np.asarray(out.dataobj)
        assert seg.shape == image.shape and np.allclose(out.affine, image.affine, atol=1e-4)  # the CT's own grid
        assert set(np.unique(seg)) <= set(range(len(ORGANS) + 1))
        for organ, file_id in truth.items():  # ground-truth organs kept exactly, nowhere else
            assert np.array_equal(seg == organ, gt == file_id), (entry["image"], ORGANS[organ - 1])
        annotated_ids = [ORGAN[o] for o in annotated]
        assert np.isin(seg[gt == 0], annotated_ids).sum() == 0
    assert not list(tmp_path.parent.glob(f".tmp-*-{tmp_path.name}"))  # the staging folder became tmp_path

    # A second run into the same, now non-empty, folder is refused before any work; nothing changes.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = bundle("--cohorts", str(data / "cohorts.json"), "--ckpt_path", str(model), "--output_dir", str(tmp_path), *SMALL,
                  configs=("seg_inference",))  # fmt: skip
    assert proc.returncode != 0 and f"output folder {tmp_path} already exists and is not empty" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def _unknown_organ(c):
    c[0]["labels"]["6"] = "hepar"


def _id_absent(c):
    c[1]["labels"]["2"] = "right_kidney"


def _id_undeclared(c):
    c[1]["labels"].pop("12")


@pytest.mark.parametrize(
    "config, change, message",
    [
        ("seg_train", _unknown_organ, "maps to unknown organ 'hepar'"),
        ("seg_train", _id_absent, "cohort 'b': label ids [2] of its mapping occur in none"),
        ("seg_train", _id_undeclared, "label ids [12] are not in the mapping of cohort 'b'"),
        ("seg_inference", _id_absent, "cohort 'b': label ids [2] of its mapping occur in none"),
    ],
    ids=["train-unknown-organ", "train-id-absent-from-data", "train-id-not-declared", "inference-id-absent-from-data"],
)
def test_bad_cohorts_stop_before_any_output(data, trained, tmp_path, config, change, message):
    cohorts = json.loads((data / "cohorts.json").read_text())
    change(cohorts)
    path = tmp_path / "cohorts.json"
    path.write_text(json.dumps(cohorts))
    out = tmp_path / "out"
    where = (
        ["--ckpt_dir", str(out)]
        if config == "seg_train"
        else ["--output_dir", str(out), "--ckpt_path", str(trained[0])]
    )
    epochs = ["--max_epochs", "1"] if config == "seg_train" else []
    proc = bundle("--cohorts", str(path), *where, *SMALL, *epochs, configs=(config,))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
