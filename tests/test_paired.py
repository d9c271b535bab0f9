"""scripts/paired.py: paired comparison of two metrics_per_pair.csv files."""

import csv
import json
import sys
from pathlib import Path

import forkserver
import numpy as np
import pytest

from scripts.paired import compare, format_comparison, read_scores

ROOT = Path(__file__).resolve().parents[1]


def write_csv(path, rows, columns=("fixed_id", "moving_id", "dice", "hd95", "valid")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(zip(columns, row, strict=True)))
    return path


def scored(folder, dice, hd95, ids=None):
    ids = ids or [(f"{i:04d}", f"{i + 100:04d}") for i in range(len(dice))]
    rows = [(f, m, d, h, True) for (f, m), d, h in zip(ids, dice, hd95, strict=True)]
    return write_csv(folder / "metrics_per_pair.csv", rows)


def test_differences_direction_and_interval(tmp_path):
    rng = np.random.default_rng(0)
    dice_a = rng.uniform(0.7, 0.9, 20)
    hd_a = rng.uniform(1.0, 3.0, 20)
    dice_b = dice_a + 0.01 + rng.normal(0, 0.002, 20)
    hd_b = hd_a + 0.2  # worse for every pair
    a, b = scored(tmp_path / "a", dice_a, hd_a).parent, scored(tmp_path / "b", dice_b, hd_b).parent
    r = compare(a, b)
    d, h = r["metrics"]["dice"], r["metrics"]["hd95"]
    assert r["num_pairs"] == 20 and d["n"] == 20
    assert d["mean_diff"] == pytest.approx(np.mean(dice_b - dice_a))
    assert d["ci95"][0] < d["mean_diff"] < d["ci95"][1] and d["ci95"][0] > 0
    assert (d["better"], d["worse"]) == (20, 0) and d["wilcoxon_p"] < 1e-4
    # lower is better for HD95: larger values are worse
    assert h["lower_is_better"] and (h["better"], h["worse"]) == (0, 20)
    assert h["mean_diff"] == pytest.approx(0.2)
    table = format_comparison(r)
    assert "hd95 (lower is better)" in table and "| 20 / 0 |" in table


def test_pairs_matched_by_id_not_order_and_nan_left_out(tmp_path):
    ids = [("0001", "0002"), ("0003", "0004"), ("0005", "0006")]
    a = scored(tmp_path / "a", [0.5, 0.6, 0.7], [1, 2, 3], ids)
    b = scored(tmp_path / "b", [0.8, float("nan"), 0.6], [3, 2, 1], ids[::-1])  # reversed order
    r = compare(a, b)
    # B's rows, by id: 0005/0006 -> 0.8, 0003/0004 -> nan, 0001/0002 -> 0.6
    assert r["metrics"]["dice"]["n"] == 2
    assert r["metrics"]["dice"]["mean_diff"] == pytest.approx(((0.6 - 0.5) + (0.8 - 0.7)) / 2)
    assert r["metrics"]["hd95"]["equal"] == 3  # identical per pair once matched


def test_identical_files_no_test(tmp_path):
    a = scored(tmp_path / "a", [0.5, 0.6], [1, 2])
    r = compare(a, a)["metrics"]["dice"]
    assert r["mean_diff"] == 0 and r["wilcoxon_p"] is None and r["equal"] == 2


def test_refusals_name_the_file(tmp_path):
    a = scored(tmp_path / "a", [0.5, 0.6], [1, 2])
    other = scored(tmp_path / "b", [0.5, 0.6], [1, 2], [("0000", "0100"), ("0009", "0008")])
    with pytest.raises(ValueError, match="different pairs.*1 only in the first.*1 only in the second"):
        compare(a, other)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_scores(tmp_path / "missing")
    dup = write_csv(tmp_path / "dup.csv", [("0001", "0002", 0.5, 1, True)] * 2)
    with pytest.raises(ValueError, match="dup.csv: line 3: pair 0001/0002 appears twice"):
        read_scores(dup)
    bad = write_csv(tmp_path / "bad.csv", [("0001", "0002", "high", 1, True)])
    with pytest.raises(ValueError, match="bad.csv: line 2: dice is 'high'"):
        read_scores(bad)
    nokey = write_csv(tmp_path / "nokey.csv", [(0.5, 1)], columns=("dice", "hd95"))
    with pytest.raises(ValueError, match="nokey.csv: needs the columns"):
        read_scores(nokey)
    with pytest.raises(ValueError, match=r"metrics \['hd99'\] are not in both"):
        compare(a, a, ["hd99"])


def test_command_line(tmp_path):
    a = scored(tmp_path / "a", [0.5, 0.6, 0.7], [1, 2, 3])
    b = scored(tmp_path / "b", [0.6, 0.6, 0.8], [1, 2, 3])
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, "-m", "scripts.paired"]
    ok = forkserver.run(cmd + [str(a), str(b), "--json_path", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| dice | 0.6000 | 0.6667 | 0.0667 |" in ok.stdout
    assert json.loads(out.read_text())["metrics"]["dice"]["better"] == 2
    out2 = tmp_path / "none.json"
    c = scored(tmp_path / "c", [0.5], [1], [("0042", "0043")])
    bad = forkserver.run(cmd + [str(a), str(c), "--json_path", str(out2)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    assert not out2.exists()
