"""End-to-end tests of scripts/evaluation.evaluate_folder on tiny NIfTI files."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from ignite.engine import Events

from scripts.evaluation import EvaluationEngine, evaluate_folder
from scripts.learn2reg import disp_name as disp_filename
from scripts.metrics import dice_per_label, warp_labels_official

SHAPE = (12, 12, 12)


def save(path, arr, zooms=(1.0, 1.0, 1.0)):
    img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.diag(list(zooms) + [1.0]))
    nib.save(img, str(path))
    return str(path)


def two_labels(offset=0):
    seg = np.zeros(SHAPE)
    seg[2 + offset : 6 + offset, 2:6, 2:6] = 1
    seg[7:10, 6:10, 6:10] = 2
    return seg


@pytest.fixture
def dataset(tmp_path):
    """Three pairs: identical maps + zero field, shifted maps + zero field, shifted + correcting field."""
    labels_dir, disp_dir = tmp_path / "labelsTr", tmp_path / "disp"
    labels_dir.mkdir()
    disp_dir.mkdir()
    segs = {"0201": two_labels(), "0202": two_labels(), "0203": two_labels(offset=1)}
    paths = {i: save(labels_dir / f"Hippo_{i}_0000.nii.gz", s, zooms=(2.0, 1.0, 1.0)) for i, s in segs.items()}
    correct = np.zeros(SHAPE + (3,))
    correct[..., 0] = 1.0  # warped(x) = moving(x + e0) undoes the +1 offset of label 1
    fields = {
        ("0201", "0202"): np.zeros(SHAPE + (3,)),
        ("0201", "0203"): np.zeros(SHAPE + (3,)),
        ("0202", "0203"): correct,
    }
    pairs = []
    for (f, m), disp in fields.items():
        save(disp_dir / disp_filename(f, m), disp)
        pairs.append({"fixed_id": f, "moving_id": m, "fixed_label": paths[f], "moving_label": paths[m]})
    return pairs, disp_dir, tmp_path / "out", segs, fields


def test_evaluate_folder_end_to_end(dataset):
    pairs, disp_dir, out, segs, fields = dataset
    summary = evaluate_folder(pairs, str(disp_dir), str(out))

    # expected per-pair Dice by an independent route
    expected_dice = []
    for p in pairs:
        warped = warp_labels_official(segs[p["moving_id"]], fields[(p["fixed_id"], p["moving_id"])])
        expected_dice.append(np.mean(dice_per_label(segs[p["fixed_id"]], warped, segs[p["moving_id"]], [1, 2])))
    assert expected_dice[0] == 1.0 and expected_dice[1] < 1.0

    with open(out / "metrics_per_pair.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "fixed_id",
        "moving_id",
        "dice",
        "hd95",
        "hd95_mm",
        "sdlogj",
        "sdlogj_plain",
        "folding_percent",
        "dice_1",
        "dice_2",
        "valid",
    ]
    assert [(r["fixed_id"], r["moving_id"]) for r in rows] == [("0201", "0202"), ("0201", "0203"), ("0202", "0203")]
    np.testing.assert_allclose([float(r["dice"]) for r in rows], expected_dice)
    assert float(rows[0]["hd95"]) == 0.0 and float(rows[2]["sdlogj"]) == 0.0  # constant field: J = 1
    assert float(rows[1]["dice_2"]) == 1.0 and float(rows[1]["dice_1"]) == pytest.approx(2 * 48 / 128)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == summary
    assert saved["num_pairs"] == 3 and saved["labels"] == [1, 2]
    assert "official" in saved["definitions"].lower()
    for m in ("dice", "hd95", "hd95_mm", "sdlogj", "sdlogj_plain", "folding_percent", "dice_1", "dice_2"):
        assert set(saved[m]) >= {"mean", "std", "p30"}
    assert saved["dice"]["mean"] == pytest.approx(np.mean(expected_dice))
    assert saved["dice"]["p30"] == pytest.approx(np.quantile(expected_dice, 0.3))
    assert saved["folding_percent"]["mean"] == 0.0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # temp files replaced


class Recorder:
    """A handler as MONAI's MLFlowHandler attaches: what the engine's state holds when each epoch completes."""

    def __init__(self):
        self.seen = []

    def attach(self, engine):
        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: self.seen.append((e.state.epoch, dict(e.state.metrics)))
        )


def test_evaluation_engine_hands_its_handlers_the_summary(dataset):
    """configs/evaluate.json's engine: one evaluation, whose means, Dice30 and counts its handlers (MLflow's, with
    --tracking mlflow) read from state.metrics; a metric without a finite value is left out."""
    pairs, disp_dir, out, _, _ = dataset
    recorder = Recorder()
    summary = EvaluationEngine(pairs, str(disp_dir), str(out), labels=[1, 2, 3], handlers=[recorder]).evaluate()
    assert summary == json.loads((out / "metrics.json").read_text())
    ((epoch, metrics),) = recorder.seen
    names = ("dice", "hd95", "hd95_mm", "sdlogj", "sdlogj_plain", "folding_percent", "dice_1", "dice_2")
    expected = {m: summary[m]["mean"] for m in names}
    expected.update(dice30=summary["dice"]["p30"], num_pairs=3, num_invalid=0)
    assert summary["dice_3"]["mean"] is None  # label 3 is in no map
    assert epoch == 1 and metrics == pytest.approx(expected)


def test_hd95_mm_uses_header_spacing(dataset):
    pairs, disp_dir, out, _, _ = dataset
    evaluate_folder(pairs[1:2], disp_dir, out)  # label 1 shifted by 1 voxel along the 2 mm axis
    with open(out / "metrics_per_pair.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["hd95"]) == pytest.approx(0.5)  # label 1: 1 voxel, label 2: 0 -> mean 0.5
    assert float(row["hd95_mm"]) == pytest.approx(1.0)  # 2 mm and 0 mm


def test_explicit_labels_and_absent_label(dataset):
    pairs, disp_dir, out, _, _ = dataset
    summary = evaluate_folder(pairs, disp_dir, out, labels=[1, 2, 5])
    assert summary["labels"] == [1, 2, 5]
    assert summary["dice_5"]["mean"] is None and summary["dice_5"]["n"] == 0  # NaN -> null


def test_missing_disp_file_raises_and_writes_nothing(dataset):
    pairs, disp_dir, out, _, _ = dataset
    (disp_dir / disp_filename("0201", "0203")).unlink()
    with pytest.raises(FileNotFoundError, match="disp_0201_0000_0203_0000.nii.gz"):
        evaluate_folder(pairs, disp_dir, out)
    assert not out.exists()


def test_wrong_shape_raises_naming_file_and_writes_nothing(dataset):
    pairs, disp_dir, out, _, _ = dataset
    save(disp_dir / disp_filename("0202", "0203"), np.zeros(SHAPE + (2,)))
    with pytest.raises(
        ValueError, match=r"disp_0202_0000_0203_0000.nii.gz: shape \(12, 12, 12, 2\), " r"expected \(12, 12, 12, 3\)"
    ):
        evaluate_folder(pairs, disp_dir, out)
    assert not out.exists()


def test_short_official_name_accepted(dataset):
    pairs, disp_dir, out, _, _ = dataset
    long_name = disp_dir / disp_filename("0201", "0202")
    long_name.rename(disp_dir / "disp_0201_0202.nii.gz")
    assert evaluate_folder(pairs, disp_dir, out)["num_pairs"] == 3
