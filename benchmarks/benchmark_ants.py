"""The bundle versus ANTs SyN on the same pairs in the same run: seconds per pair and accuracy.

- The bundle: ``python -m monai.bundle run --config_file configs/inference.json --figures False``
  (a fresh process, the shipped weights); seconds per pair from its ``timing.csv`` (network and
  integration) and the wall time of the whole command.
- ANTs: ``benchmarks/ants/register.py`` in its own environment (``bash benchmarks/ants/setup_venv.sh``:
  antspyx needs older numpy / scipy than the bundle), ``ants.registration(type_of_transform="SyN")``
  with the antspyx defaults; seconds of ``ants.registration`` per pair and the wall time.
- Both with ``--threads`` threads (OMP / MKL / ITK), one after the other, on the first ``--num_pairs``
  pairs; both folders of displacement files scored by ``scripts.evaluation.evaluate_folder`` (the
  official Learn2Reg definitions, as configs/evaluate.json).

    bash benchmarks/ants/setup_venv.sh
    python benchmarks/benchmark_ants.py --dataset_dir runs/HippocampusMR --num_pairs 40 --threads 2 \\
        --json benchmarks/ants_vs_bundle.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANTS_PYTHON = ROOT / ".venv-ants" / "bin" / "python"


def _seconds(folder: Path) -> list[float]:
    return [float(r.split(",")[2]) for r in (folder / "timing.csv").read_text().splitlines()[1:]]


def _run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=str(ROOT / "sample_data" / "HippocampusMR"))
    parser.add_argument("--pairs_selection", default="registration_val")
    parser.add_argument("--num_pairs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not ANTS_PYTHON.is_file():
        parser.error(f"{ANTS_PYTHON} not found: run bash benchmarks/ants/setup_venv.sh first")

    sys.path.insert(0, str(ROOT))
    from scripts.evaluation import evaluate_folder
    from scripts.learn2reg import pairs as read_pairs

    pairs = read_pairs(args.dataset_dir, args.pairs_selection)[: args.num_pairs]
    with tempfile.TemporaryDirectory(prefix="bench-ants-") as tmp:
        return _compare(args, pairs, Path(tmp), evaluate_folder)


def _compare(args, pairs: list[dict], work: Path, evaluate_folder) -> int:
    (work / "pairs.csv").write_text(
        "fixed,moving\n" + "".join(f"{p['fixed_image']},{p['moving_image']}\n" for p in pairs)
    )
    (work / "pairs.json").write_text(json.dumps(pairs))
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=t)

    bundle_cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                  "--dataset_dir", args.dataset_dir, "--pairs_selection", str(work / "pairs.csv"),
                  "--output_dir", str(work / "bundle"), "--figures", "False"]  # fmt: skip
    bundle_wall = _run(bundle_cmd, env)
    ants_wall = _run(
        [str(ANTS_PYTHON), "benchmarks/ants/register.py", str(work / "pairs.json"), str(work / "ants")], env
    )

    results = {}
    for name, wall in (("bundle", bundle_wall), ("ants_syn", ants_wall)):
        folder = work / name.split("_")[0]
        metrics = evaluate_folder(pairs, folder, work / f"{name}_metrics")
        seconds = _seconds(folder)
        results[name] = {
            "seconds_per_pair_median": statistics.median(seconds),
            "seconds_per_pair_mean": statistics.mean(seconds),
            "wall_seconds_whole_run": wall,
            **{m: metrics[m]["mean"] for m in ("dice", "hd95", "sdlogj", "folding_percent")},
            "dice30": metrics["dice"]["p30"],
        }
    ratio = results["ants_syn"]["seconds_per_pair_median"] / results["bundle"]["seconds_per_pair_median"]
    print("| method | s per pair (median) | whole run (s) | Dice | Dice30 | HD95 | SDlogJ | folding % |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds_per_pair_median']:.3f} | {r['wall_seconds_whole_run']:.1f} | {r['dice']:.3f} | "
            f"{r['dice30']:.3f} | {r['hd95']:.2f} | {r['sdlogj']:.3f} | {r['folding_percent']:.2f} |"
        )
    print(f"ANTs SyN takes {ratio:.1f} times as long per pair as the bundle ({len(pairs)} pairs, {t} threads)")
    if args.json:
        import torch

        meta = {
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "pairs": len(pairs),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "dataset_dir": os.path.relpath(args.dataset_dir, ROOT),
            "pairs_selection": args.pairs_selection,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results, "ants_over_bundle": ratio}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
