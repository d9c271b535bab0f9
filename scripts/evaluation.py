"""Evaluate a folder of Learn2Reg displacement files with the official metric definitions.

Callable from a bundle config, e.g. ``"$scripts.evaluation.evaluate_folder(@pairs, @disp_dir,
@output_dir)"``: plain lists / dicts / strings in, a plain dict out.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts import learn2reg
from scripts.files import atomic_path, save_nifti
from scripts.learn2reg import disp_name
from scripts.metrics import evaluate_pair, summarize

__all__ = ["evaluate_folder", "format_summary", "identity_baseline"]

METRICS = ("dice", "hd95", "hd95_mm", "sdlogj", "sdlogj_plain", "folding_percent")

DEFINITIONS = (
    "Official Learn2Reg definitions (github.com/MDL-UzL/L2R evaluation/): dice (per label, NaN if "
    "the label is absent from the fixed or moving map, mean over labels), hd95 (95th-percentile "
    "surface distance with spacing forced to 1, so in voxels), sdlogj (std(log(clip(J + 3, 1e-9, "
    "1e9))), J by central differences cropped by 2 voxels), p30 = np.quantile(per-pair values, 0.3). "
    "Not official: hd95_mm (same with the fixed label map's header spacing), sdlogj_plain "
    "(std(log J) over J > 0), folding_percent (100 * fraction of J <= 0). Aggregates ignore NaN "
    "pairs (the official mean does not); std is the population std (ddof=0) as officially; "
    "non-finite numbers are null in metrics.json and nan/inf in the CSV."
)


def _id(value) -> str:
    return f"{value:04d}" if isinstance(value, (int, np.integer)) else str(value)


def _find_disp(disp_dir: Path, pair: dict) -> Path:
    long_name = disp_name(_id(pair["fixed_id"]), _id(pair["moving_id"]))
    for name in (long_name, disp_name(_id(pair["fixed_id"]), _id(pair["moving_id"]), "short")):
        if (disp_dir / name).is_file():
            return disp_dir / name
    raise FileNotFoundError(f"{long_name}: displacement file missing in {disp_dir}")


def _check_pairs(pairs: Sequence[dict], disp_dir: Path) -> list[Path]:
    """Check every file and shape from the headers alone, before any computation or writing."""
    if len(pairs) == 0:
        raise ValueError("pairs is empty: nothing to evaluate")
    disp_paths = []
    for i, pair in enumerate(pairs):
        missing = {"fixed_id", "moving_id", "fixed_label", "moving_label"} - set(pair)
        if missing:
            raise ValueError(f"pair {i} lacks the keys {sorted(missing)}")
        for key in ("fixed_label", "moving_label"):
            if not Path(pair[key]).is_file():
                raise FileNotFoundError(f"{pair[key]}: label map missing ({key} of pair {i})")
        fixed_shape = tuple(nib.load(pair["fixed_label"]).shape)
        if len(fixed_shape) != 3:
            raise ValueError(f"{pair['fixed_label']}: shape {fixed_shape}, expected a 3-D label map")
        path = _find_disp(disp_dir, pair)
        shape, expected = tuple(nib.load(path).shape), fixed_shape + (3,)
        if shape != expected:
            # e.g. (H, W, D, 1, 3) from ITK/MONAI vector writers, or a half-resolution field
            raise ValueError(f"{path.name}: shape {shape}, expected {expected}")
        disp_paths.append(path)
    return disp_paths


def _label_values(path: str) -> set:
    values = np.unique(np.asarray(nib.load(path).dataobj))
    return {int(v) if float(v).is_integer() else float(v) for v in values if v != 0}


def _finite_or_none(value):
    """Strict JSON / CSV: NaN and inf become null / empty."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_folder(
    pairs: Sequence[dict], disp_dir: str | os.PathLike, output_dir: str | os.PathLike, labels=None
) -> dict:
    """Score every pair's displacement file and write ``metrics_per_pair.csv`` and ``metrics.json``.

    Args:
        pairs: dicts with ``fixed_id``, ``moving_id`` (e.g. "0201", or an int written as 4 digits),
            ``fixed_label``, ``moving_label`` (paths to NIfTI label maps).
        disp_dir: folder with ``disp_<fixed_id>_0000_<moving_id>_0000.nii.gz`` per pair
            ((H, W, D, 3) = fixed shape + (3,), voxels, read with ``get_fdata``); the official
            short name ``disp_<fixed_id>_<moving_id>.nii.gz`` is accepted when the long one is absent.
        output_dir: created if needed; both files are written atomically.
        labels: label values to score; default the union of non-zero values in all label maps.

    Returns:
        ``{metric: {"mean", "std", "p30", "n"}}`` for dice, hd95 (voxels), hd95_mm, sdlogj,
        sdlogj_plain, folding_percent (%), and ``dice_<label>``; plus ``num_pairs``, ``labels``,
        ``definitions``. NaN values are None (as written to metrics.json).

    Raises:
        FileNotFoundError / ValueError naming the file, before anything is computed or written.
    """
    disp_dir, output_dir = Path(disp_dir), Path(output_dir)
    disp_paths = _check_pairs(pairs, disp_dir)
    if labels is None:
        paths = {p[k] for p in pairs for k in ("fixed_label", "moving_label")}
        labels = sorted(set().union(*(_label_values(p) for p in sorted(paths))))
    labels = [int(v) if float(v).is_integer() else float(v) for v in labels]

    rows = []
    for pair, disp_path in zip(pairs, disp_paths):
        fixed_img = nib.load(pair["fixed_label"])
        fixed = fixed_img.get_fdata()
        moving = nib.load(pair["moving_label"]).get_fdata()
        disp = nib.load(disp_path).get_fdata()
        spacing = fixed_img.header.get_zooms()[:3]
        res = evaluate_pair(fixed, moving, disp, labels, spacing=spacing)
        row = {"fixed_id": _id(pair["fixed_id"]), "moving_id": _id(pair["moving_id"])}
        row.update({m: res[m] for m in METRICS})
        row.update({f"dice_{label}": d for label, d in zip(labels, res["dice_per_label"])})
        rows.append(row)

    columns = list(rows[0])
    summary = {m: summarize([r[m] for r in rows]) for m in columns[2:]}
    summary = {m: {k: _finite_or_none(v) for k, v in s.items()} for m, s in summary.items()}
    summary.update({"num_pairs": len(rows), "labels": labels, "definitions": DEFINITIONS})

    output_dir.mkdir(parents=True, exist_ok=True)

    with atomic_path(str(output_dir / "metrics_per_pair.csv")) as tmp, open(tmp, "w", newline="") as f:
        # NaN / inf stay as "nan" / "inf", which pandas and numpy read back
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(str(output_dir / "metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    return summary


def format_summary(summary: dict) -> str:
    """A Markdown table (metric, mean, std, 30th percentile) of ``evaluate_folder``'s result."""
    lines = [f"{summary['num_pairs']} pairs, labels {summary['labels']}", "", "| metric | mean | std | p30 |", "|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for name in METRICS:
        s = summary[name]
        lines.append(f"| {name} | {fmt(s['mean'])} | {fmt(s['std'])} | {fmt(s['p30'])} |")
    return "\n".join(lines)


def identity_baseline(dataset_dir: str, output_dir: str, pairs_selection: str = "registration_val", num_val: int = 40) -> dict:
    """The unregistered baseline: writes a zero displacement file per pair into ``output_dir``
    (fixed shape + (3,), float32, fixed affine) and evaluates it like any submission.

    Command line: ``python -m scripts.evaluation --dataset_dir DIR --output_dir DIR``.
    """
    pairs = learn2reg.pairs(dataset_dir, pairs_selection, num_val)
    os.makedirs(output_dir, exist_ok=True)
    for pair in pairs:
        fixed = nib.load(pair["fixed_image"])
        zero = np.zeros(tuple(fixed.shape[:3]) + (3,), np.float32)
        save_nifti(zero, fixed.affine, os.path.join(output_dir, disp_name(pair["fixed_id"], pair["moving_id"])))
    return evaluate_folder(pairs, output_dir, output_dir)


def _main(dataset_dir: str, output_dir: str, pairs_selection: str = "registration_val", num_val: int = 40) -> None:
    print(format_summary(identity_baseline(dataset_dir, output_dir, pairs_selection, num_val)))


if __name__ == "__main__":
    import fire

    fire.Fire(_main)
