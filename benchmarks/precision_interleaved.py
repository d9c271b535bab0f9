"""float32 against bfloat16 (``--precision`` of the configs), step by step in one process.

This project's CPUs are shared virtual machines whose speed drifts by up to 1.7x between runs minutes
apart (the same float32 training step of the shipped width measured 1.49, 1.82 and 2.56 s in three
``benchmark_network.py`` runs of one session), so two precisions timed one after the other compare the
machine's moods as much as the precisions. Here the two alternate, step by step, and the ratio of each
neighbouring pair is reported (median, min, max) with the median times.

    python benchmarks/precision_interleaved.py --channels 8,16,32,64,128 --deep_supervision False \\
        --modes train eval --pairs 10 --json benchmarks/precision_interleaved_w8_cpu.json
    python benchmarks/precision_interleaved.py --channels 16,32,64,128,256 --deep_supervision True \\
        --modes train eval --pairs 6 --json benchmarks/precision_interleaved_w16_cpu.json

Modes and steps are ``benchmark_network.py``'s (``make_steps``): ``train`` (batch 2, both directions,
LNCC + Dice + smoothness, backward, Adam), ``eval`` (batch 1, no_grad, the DDF); 64^3, channels_last
weights, random data; both precisions step the same network (and, in train mode, one optimiser).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, channels: tuple[int, ...], deep_supervision: bool, pairs: int) -> dict:
    import torch
    from benchmark_network import make_steps, parse_case  # this folder is on sys.path when run as a script

    from scripts.networks import SpatialGradientRegNet

    torch.manual_seed(0)
    net = SpatialGradientRegNet(in_channels=1, channels=channels, deep_supervision=deep_supervision)
    net = net.to(memory_format=torch.channels_last_3d)
    steps = make_steps(parse_case(f"{mode}:64x64x64:1:{2 if mode == 'train' else 1}"), net, ["float32", "bfloat16"])

    for step in steps.values():  # warm-up
        step()
    times = {p: [] for p in steps}
    for _ in range(pairs):
        for p, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[p].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["float32"], times["bfloat16"], strict=True)]
    return {
        "mode": mode,
        "channels": list(channels),
        "deep_supervision": deep_supervision,
        "pairs": pairs,
        "float32_median_s": statistics.median(times["float32"]),
        "bfloat16_median_s": statistics.median(times["bfloat16"]),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8, 16, 32, 64, 128))
    parser.add_argument("--deep_supervision", type=lambda s: {"true": True, "false": False}[s.lower()], default=False)
    parser.add_argument("--modes", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    parser.add_argument("--pairs", type=int, default=10, help="float32 / bfloat16 pairs of steps timed per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    from scripts.inferers import native_bfloat16

    torch.set_num_threads(args.threads)
    results = [measure(m, args.channels, args.deep_supervision, args.pairs) for m in args.modes]
    print("| mode | float32 median (s) | bfloat16 median (s) | speed-up median (min–max) |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['float32_median_s']:.3f} | {r['bfloat16_median_s']:.3f} "
            f"| {r['speedup_median']:.2f} ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) |"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": args.threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bfloat16": native_bfloat16(torch.device("cpu")),
            "command": shlex.join(
                ["python", "benchmarks/precision_interleaved.py", *(sys.argv[1:] if argv is None else argv)]
            ),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
