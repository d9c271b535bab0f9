"""Evaluate a folder of Learn2Reg displacement files with the official metric definitions.

Callable from a bundle config, e.g. ``"$scripts.evaluation.evaluate_folder(@pairs, @disp_dir,
@output_dir)"``: plain lists / dicts / strings in, a plain dict out.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from ignite.engine import Engine

from scripts import learn2reg
from scripts.files import atomic_path, save_nifti, sha256_of
from scripts.handlers import MANIFEST
from scripts.learn2reg import disp_name
from scripts.metrics import evaluate_pair, summarize

__all__ = ["EvaluationEngine", "evaluate_folder", "format_summary", "identity_baseline", "scalar_metrics"]

METRICS = ("dice", "hd95", "hd95_mm", "sdlogj", "sdlogj_plain", "folding_percent")

DEFINITIONS = (
    "Official Learn2Reg definitions (github.com/MDL-UzL/L2R evaluation/): dice (per label, NaN if "
    "the label is absent from the fixed or moving map, mean over labels), hd95 (95th-percentile "
    "surface distance with spacing forced to 1, so in voxels), sdlogj (std(log(clip(J + 3, 1e-9, "
    "1e9))), J by central differences cropped by 2 voxels), p30 = np.quantile(per-pair values, 0.3). "
    "Not official: hd95_mm (same with the fixed label map's header spacing), sdlogj_plain "
    "(std(log J) over J > 0), folding_percent (100 * fraction of J <= 0). Aggregates ignore NaN "
    "values (n counts the others); std is the population std (ddof=0); non-finite numbers are null in "
    "metrics.json and nan/inf in the CSV. A pair whose displacement field holds NaN or infinite values is "
    "invalid: not scored (every metric NaN, valid = False), counted in num_invalid and listed in invalid_pairs."
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


def _check_manifest(disp_dir: Path, disp_paths: list[Path]) -> None:
    """A folder written by configs/inference.json has a manifest.json with the sha256 of every file
    it wrote: refuse, naming it, a displacement file that the run recorded there did not write
    (a folder mixing several runs' results). Folders without a manifest (other tools) are scored as
    they are."""
    path = disp_dir / MANIFEST
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e}); remove it to score the folder as it is") from e
    for disp in disp_paths:
        recorded = files.get(disp.name)
        if recorded is None or recorded != sha256_of(str(disp)):
            what = "is not listed in" if recorded is None else "was changed since it was written by the run of"
            raise ValueError(
                f"{disp}: {what} {path}: the folder mixes the results of several runs; register again into an "
                "empty folder (or remove manifest.json to score the files as they are)"
            )


def _read_disp(path: Path) -> np.ndarray:
    try:
        return nib.load(path).get_fdata()  # float64, as the official evaluation reads it
    except Exception as e:  # truncated gzip (EOFError), corrupt data (zlib / nibabel errors)
        raise ValueError(f"{path}: cannot read the displacement field ({type(e).__name__}: {e})") from e


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
        sdlogj_plain, folding_percent (%), and ``dice_<label>``; plus ``num_pairs``,
        ``num_invalid`` and ``invalid_pairs`` (fields with NaN / inf, not scored), ``labels``,
        ``definitions``. NaN values are None (as written to metrics.json).

    Raises:
        FileNotFoundError / ValueError naming the file, before anything is written: a missing,
        unreadable or misshapen displacement file, and (when ``disp_dir`` holds the manifest.json of
        configs/inference.json) one that the recorded run did not write.
    """
    disp_dir, output_dir = Path(disp_dir), Path(output_dir)
    disp_paths = _check_pairs(pairs, disp_dir)
    _check_manifest(disp_dir, disp_paths)
    if labels is None:
        paths = {p[k] for p in pairs for k in ("fixed_label", "moving_label")}
        labels = sorted(set().union(*(_label_values(p) for p in sorted(paths))))
    labels = [int(v) if float(v).is_integer() else float(v) for v in labels]

    rows, invalid = [], []
    for pair, disp_path in zip(pairs, disp_paths, strict=True):
        disp = _read_disp(disp_path)
        row = {"fixed_id": _id(pair["fixed_id"]), "moving_id": _id(pair["moving_id"])}
        bad = int(disp.size - np.isfinite(disp).sum())
        if bad:
            res = {m: float("nan") for m in METRICS}
            res["dice_per_label"] = [float("nan")] * len(labels)
            invalid.append({**row, "file": disp_path.name, "problem": f"{bad} NaN or infinite values"})
        else:
            fixed_img = nib.load(pair["fixed_label"])
            moving = nib.load(pair["moving_label"]).get_fdata()
            res = evaluate_pair(fixed_img.get_fdata(), moving, disp, labels, spacing=fixed_img.header.get_zooms()[:3])
        row.update({m: res[m] for m in METRICS})
        row.update({f"dice_{label}": d for label, d in zip(labels, res["dice_per_label"], strict=True)})
        row["valid"] = not bad
        rows.append(row)

    columns = list(rows[0])
    summary = {m: summarize([r[m] for r in rows]) for m in columns[2:-1]}
    summary = {m: {k: _finite_or_none(v) for k, v in s.items()} for m, s in summary.items()}
    summary.update({"num_pairs": len(rows), "num_invalid": len(invalid), "invalid_pairs": invalid})
    summary.update({"labels": labels, "definitions": DEFINITIONS})

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
    lines = [f"{summary['num_pairs']} pairs, labels {summary['labels']}"]
    if summary.get("num_invalid"):
        listed = ", ".join(f"{p['file']} ({p['problem']})" for p in summary["invalid_pairs"][:5])
        more = " ..." if summary["num_invalid"] > 5 else ""
        lines.append(
            f"WARNING: {summary['num_invalid']} of {summary['num_pairs']} pairs have a displacement field with NaN or "
            f"infinite values and were not scored (valid = False in metrics_per_pair.csv): {listed}{more}"
        )
    lines += ["", "| metric | mean | std | p30 | n |", "|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for name in METRICS:
        s = summary[name]
        lines.append(f"| {name} | {fmt(s['mean'])} | {fmt(s['std'])} | {fmt(s['p30'])} | {s['n']} |")
    return "\n".join(lines)


def scalar_metrics(summary: dict) -> dict[str, float]:
    """The numbers of an ``evaluate_folder`` summary that an experiment tracker plots: the mean of each metric
    (``dice``, ``hd95``, ..., ``dice_<label>``), ``dice30`` (the official 30th percentile of Dice),
    ``num_pairs`` and ``num_invalid``; a metric without a finite mean is left out."""
    means = {m: s["mean"] for m, s in summary.items() if isinstance(s, dict) and "mean" in s}
    values = {**means, "dice30": summary["dice"]["p30"], "num_pairs": summary["num_pairs"]}
    values["num_invalid"] = summary["num_invalid"]
    return {k: float(v) for k, v in values.items() if v is not None}


class EvaluationEngine(Engine):
    """``evaluate_folder`` as an Ignite engine of one iteration, so that handlers attached to it (MONAI's
    ``MLFlowHandler`` with ``--tracking mlflow``, through configs/evaluate.json's ``handlers``) see the
    evaluation: ``state.metrics`` holds ``scalar_metrics`` of the summary when the epoch completes, and
    ``state.output`` the summary itself.
    """

    def __init__(self, pairs: Sequence[dict], disp_dir, output_dir, labels=None, handlers: Sequence = ()) -> None:
        super().__init__(self._evaluate)
        self.logger.setLevel(logging.WARNING)  # one iteration of one epoch: Ignite's progress lines say nothing
        self.args = (pairs, disp_dir, output_dir, labels)
        for handler in handlers:
            handler.attach(self)

    def _evaluate(self, engine: Engine, batch) -> dict:
        summary = evaluate_folder(*self.args)
        engine.state.metrics.update(scalar_metrics(summary))
        return summary

    def evaluate(self) -> dict:
        """Run the evaluation once; its summary (``evaluate_folder``'s return value)."""
        self.run([None], max_epochs=1)
        return self.state.output


def identity_baseline(
    dataset_dir: str, output_dir: str, pairs_selection: str = "registration_val", num_val: int = 40
) -> dict:
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
