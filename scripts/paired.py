# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Paired comparison of two scorings of the same pairs (``metrics_per_pair.csv`` of configs/evaluate.json).

Two models' means on 40 pairs differ by a few thousandths; whether that is a real gain depends on how
consistently one beats the other pair by pair. For each metric: the mean of B - A over the pairs both
scored, its 95 % confidence interval (Student t), how many pairs B improves / worsens (lower is better
for HD95, SDlogJ and folding) and the two-sided Wilcoxon signed-rank p-value (scipy).

    python -m scripts.paired runs/val_old runs/val_new [--json_path runs/paired.json]
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from scripts.files import atomic_path

LOWER_IS_BETTER = ("hd95", "hd95_mm", "sdlogj", "sdlogj_plain", "folding_percent")
KEYS = ("fixed_id", "moving_id")


def read_scores(path: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """``{(fixed_id, moving_id): {metric: value}}`` from a metrics_per_pair.csv or the folder holding it.

    Raises:
        FileNotFoundError / ValueError naming the file: missing, no pair columns, a pair twice, a value
        that is not a number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics_per_pair.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (the metrics_per_pair.csv of configs/evaluate.json)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if not all(k in columns for k in KEYS):
            raise ValueError(f"{path}: needs the columns {', '.join(KEYS)}; has {columns}")
        scores = {}
        for line, row in enumerate(reader, start=2):
            key = (row["fixed_id"], row["moving_id"])
            if key in scores:
                raise ValueError(f"{path}: line {line}: pair {key[0]}/{key[1]} appears twice")
            values = {}
            for name in columns:
                if name in KEYS or name == "valid":
                    continue
                try:
                    values[name] = float(row[name])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: line {line}: {name} is {row[name]!r}, not a number") from None
            scores[key] = values
    if not scores:
        raise ValueError(f"{path}: no pairs")
    return scores


def compare(a: str | Path, b: str | Path, metrics=None) -> dict:
    """Paired statistics of B - A for every metric both files have (or ``metrics``).

    Returns:
        ``{"a", "b", "num_pairs", "metrics": {name: {"mean_a", "mean_b", "mean_diff", "ci95", "n",
        "better", "worse", "equal", "wilcoxon_p", "lower_is_better"}}}``; a pair whose value is NaN in
        either file is left out of that metric (``n`` says how many remain).

    Raises:
        ValueError: the files score different pairs (both lists named), or share no metric.
    """
    sa, sb = read_scores(a), read_scores(b)
    if set(sa) != set(sb):
        only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        raise ValueError(
            f"{a} and {b} score different pairs: {len(only_a)} only in the first "
            f"{['/'.join(k) for k in only_a[:3]]}, {len(only_b)} only in the second {['/'.join(k) for k in only_b[:3]]}"
        )
    pairs = sorted(sa)
    common = [m for m in sa[pairs[0]] if m in sb[pairs[0]]]
    if metrics is not None:
        missing = [m for m in metrics if m not in common]
        if missing:
            raise ValueError(f"metrics {missing} are not in both files (they share {common})")
        common = list(metrics)
    if not common:
        raise ValueError(f"{a} and {b} share no metric column")
    out = {"a": str(a), "b": str(b), "num_pairs": len(pairs), "metrics": {}}
    for name in common:
        va = np.array([sa[k][name] for k in pairs])
        vb = np.array([sb[k][name] for k in pairs])
        keep = np.isfinite(va) & np.isfinite(vb)
        va, vb = va[keep], vb[keep]
        diff = vb - va
        n = int(diff.size)
        sign = -1.0 if name in LOWER_IS_BETTER else 1.0
        res = {
            "mean_a": float(va.mean()) if n else None,
            "mean_b": float(vb.mean()) if n else None,
            "mean_diff": float(diff.mean()) if n else None,
            "ci95": None,
            "n": n,
            "better": int((sign * diff > 0).sum()),
            "worse": int((sign * diff < 0).sum()),
            "equal": int((diff == 0).sum()),
            "wilcoxon_p": None,
            "lower_is_better": name in LOWER_IS_BETTER,
        }
        if n >= 2:
            half = stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)
            res["ci95"] = [float(diff.mean() - half), float(diff.mean() + half)]
        if np.any(diff != 0):
            res["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
        out["metrics"][name] = res
    return out


def format_comparison(result: dict) -> str:
    """A Markdown table of ``compare``'s result."""
    lines = [
        f"A = {result['a']}, B = {result['b']}, {result['num_pairs']} pairs",
        "",
        "| metric | A | B | B - A | 95 % CI | B better / worse | Wilcoxon p | n |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, digits=4):
        return "" if v is None else f"{v:.{digits}f}"

    for name, r in result["metrics"].items():
        ci = "" if r["ci95"] is None else f"[{f(r['ci95'][0])}, {f(r['ci95'][1])}]"
        arrow = " (lower is better)" if r["lower_is_better"] else ""
        p = "" if r["wilcoxon_p"] is None else f"{r['wilcoxon_p']:.2g}"
        lines.append(
            f"| {name}{arrow} | {f(r['mean_a'])} | {f(r['mean_b'])} | {f(r['mean_diff'])} | {ci} | "
            f"{r['better']} / {r['worse']} | {p} | {r['n']} |"
        )
    return "\n".join(lines)


def main(a: str, b: str, metrics=None, json_path: str | None = None) -> None:
    """Prints the table; ``json_path`` also writes the result (atomically)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    result = compare(a, b, metrics)
    if json_path:  # before printing: a closed pipe (``| head``) must not lose the file
        with atomic_path(str(json_path)) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    print(format_comparison(result))


if __name__ == "__main__":
    import sys

    import fire

    try:
        fire.Fire(main, serialize=lambda _: None)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
