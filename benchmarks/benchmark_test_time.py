"""Test-time options of configs/inference.json against the plain prediction: accuracy and seconds per pair.

Each variant is one ``python -m monai.bundle run --config_file configs/inference.json --figures False``
(a fresh process) with its overrides, then its folder is scored with ``scripts.evaluation.evaluate_folder``
(the official Learn2Reg definitions, as configs/evaluate.json). Seconds per pair: the median of the run's
``timing.csv`` (network passes, integration and the test-time work; reading and writing excluded).
Variants run one after the other with ``--threads`` threads: run nothing else meanwhile.

    # the tables of docs/inference.md, "Test-time options" (40 validation pairs; ensemble_w8c, gpu_w16_*
    # and runs/model_v0.5.1.pt are machine-local weights, see VARIANTS and docs/training.md)
    python benchmarks/benchmark_test_time.py --dataset_dir runs/HippocampusMR --threads 2 \\
        --variants plain flips_all flips_0 symmetric io_lncc io_mse ensemble_w8c \\
        --set "ensemble_v051=--ensemble_ckpts runs/model_v0.5.1.pt" --json benchmarks/test_time_val_v060.json
    # (release 0.5.1's weights as models/model.pt:)
    python benchmarks/benchmark_test_time.py --dataset_dir runs/HippocampusMR --threads 2 \\
        --variants plain flips_all flips_0 flips_1 flips_2 symmetric io_lncc io_mse io_lncc_lr01_grid1 \\
        ensemble_w8c gpu_w16_plain gpu_w16_flips_all --json benchmarks/test_time_val.json
    # the network in bfloat16 (a CPU with AMX / AVX-512 BF16; elsewhere it is far slower)
    python benchmarks/benchmark_test_time.py --dataset_dir runs/HippocampusMR --threads 2 \\
        --variants plain bfloat16 --json benchmarks/test_time_val_bf16.json
    # iterative refinement (shipped weights)
    python benchmarks/benchmark_test_time.py --dataset_dir runs/HippocampusMR --threads 2 \\
        --variants plain passes_2 passes_3 --json benchmarks/test_time_val_passes.json
    # instance-optimisation settings on 12 training pairs (not the pairs reported; release 0.5.1's weights)
    python benchmarks/benchmark_test_time.py --dataset_dir runs/HippocampusMR \\
        --pairs_selection benchmarks/tune_pairs_hippocampus.csv --variants plain symmetric io_lncc io_lncc_lr001 \\
        io_lncc_lr003_grid1 io_lncc_lr01 io_lncc_grid4_lr005 io_lncc_smooth1 io_mse io_mse_lr01_grid1 \\
        --json benchmarks/test_time_tune.json

``--variants`` picks names of ``VARIANTS`` (default: ``DEFAULT``); ``--set NAME='--key value ...'`` adds
one (e.g. ``--set "mine=--io_steps 50 --io_lr 0.01"``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

W16 = ["--channels", "[16, 32, 64, 128, 256]", "--deep_supervision", "True"]
GPU_AVG = ["--ckpt_path", "runs/gpu1/model_avg_fp16.pt"]  # the 440 s H100 run of docs/training.md (machine-local)
SEG_IO = [
    "--io_steps",
    "20",
    "--io_lr",
    "0.003",
    "--io_similarity",
    "dice",
    "--io_seg_ckpt",
    "models/seg_hippocampus.pt",
]
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "flips_all": ["--tta_flips", "all"],
    "flips_0": ["--tta_flips", "[[0]]"],
    "flips_1": ["--tta_flips", "[[1]]"],
    "flips_2": ["--tta_flips", "[[2]]"],
    "sigma_05": ["--field_sigma", "0.5"],
    "sigma_075": ["--field_sigma", "0.75"],
    "sigma_1": ["--field_sigma", "1.0"],
    "symmetric": ["--tta_symmetric", "True"],
    "bfloat16": ["--precision", "bfloat16"],
    "passes_2": ["--refine_passes", "2"],
    "passes_3": ["--refine_passes", "3"],
    "ensemble_w8c": ["--ensemble_ckpts", "['runs/w8c/avg1-6.pt']"],  # CPU continuation of docs/training.md
    "io_lncc": ["--io_steps", "20"],  # the defaults: lr 0.01 on a grid 2 times coarser
    "io_lncc_lr01_grid1": ["--io_steps", "20", "--io_lr", "0.1", "--io_grid", "1"],
    "io_lncc_lr003_grid1": ["--io_steps", "20", "--io_lr", "0.003", "--io_grid", "1"],
    "io_lncc_lr01": ["--io_steps", "20", "--io_lr", "0.01", "--io_grid", "1"],
    "io_lncc_lr001": ["--io_steps", "20", "--io_lr", "0.001"],
    "io_lncc_grid4_lr005": ["--io_steps", "20", "--io_grid", "4", "--io_lr", "0.05"],
    "io_lncc_smooth1": ["--io_steps", "20", "--io_smooth_weight", "1.0"],
    "io_mse": ["--io_steps", "20", "--io_similarity", "mse"],
    "io_mse_lr01_grid1": ["--io_steps", "20", "--io_similarity", "mse", "--io_lr", "0.01", "--io_grid", "1"],
    # segmentation-guided, with the shipped segmentation network (docs/inference.md)
    "seg_io": SEG_IO,
    "seg_io_40": [*SEG_IO[:1], "40", *SEG_IO[2:]],
    "gpu_w16_plain": [*W16, *GPU_AVG],
    "gpu_w16_flips_all": [*W16, *GPU_AVG, "--tta_flips", "all"],
}
# runnable with the shipped files alone; ensemble_w8c and gpu_w16_* need the machine-local weights of
# docs/training.md "Later runs (not shipped)"
DEFAULT = ["plain", "flips_all", "flips_0", "flips_1", "flips_2", "symmetric", "io_lncc", "io_mse"]


def run_variant(name: str, overrides: list[str], args, work: Path, evaluate_folder, pairs: list[dict]) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--dataset_dir", args.dataset_dir, "--pairs_selection", args.pairs_selection,
           "--output_dir", str(out), "--figures", "False", *overrides]  # fmt: skip
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    metrics = evaluate_folder(pairs, out, work / f"{name}_metrics")
    seconds = [float(r.split(",")[2]) for r in (out / "timing.csv").read_text().splitlines()[1:]]
    return {
        "overrides": shlex.join(overrides),
        "seconds_per_pair_median": statistics.median(seconds),
        "wall_seconds_whole_run": wall,
        **{m: metrics[m]["mean"] for m in ("dice", "hd95", "sdlogj", "folding_percent")},
        "dice30": metrics["dice"]["p30"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=str(ROOT / "sample_data" / "HippocampusMR"))
    parser.add_argument("--pairs_selection", default="registration_val")
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=sorted(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=OVERRIDES", help="an extra variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants}
    for spec in args.set:
        name, sep, overrides = spec.partition("=")
        if not sep or not name:
            parser.error(f"--set takes NAME='--key value ...', got {spec!r}")
        variants[name] = shlex.split(overrides)

    sys.path.insert(0, str(ROOT))
    from scripts.evaluation import evaluate_folder
    from scripts.learn2reg import pairs as read_pairs

    pairs = read_pairs(args.dataset_dir, args.pairs_selection)
    results = {}
    print("| variant | Dice | Dice30 | HD95 | SDlogJ | folding % | s per pair |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-tt-") as tmp:
        for name, overrides in variants.items():
            r = results[name] = run_variant(name, overrides, args, Path(tmp), evaluate_folder, pairs)
            print(
                f"| {name} | {r['dice']:.4f} | {r['dice30']:.4f} | {r['hd95']:.2f} | {r['sdlogj']:.3f} | "
                f"{r['folding_percent']:.2f} | {r['seconds_per_pair_median']:.2f} |",
                flush=True,
            )
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
            "checkpoint": "models/model.pt unless the overrides say otherwise",
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
