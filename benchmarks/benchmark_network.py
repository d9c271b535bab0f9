"""CPU cost of SpatialGradientRegNet: parameters, forward wall time and peak resident memory.

Each case runs in a fresh subprocess, so one case's peak memory cannot mask another's
(``ru_maxrss`` only ever grows). Prints a Markdown table; ``--json`` also writes the numbers.

Cases are ``MODE:HxWxD:C[:B]``: MODE ``eval`` (the exported path: no_grad, one direction, DDF
out), ``lowmem`` (the same through ``scripts.inferers.LowMemoryRegistrationInferer``, slabs of 2^21
voxels, as configs/abdomen_ct.json runs whole CT volumes) or ``train`` (a full training iteration:
training-mode forward of both directions with deep supervision, the symmetric LNCC + Dice loss,
backward and an Adam step); C channels per image, B
batch (default 1). The network input is the pair, 2*C channels.

    # quick check (a few seconds, ~1 GB)
    python benchmarks/benchmark_network.py --cases eval:64x64x64:1 --repeats 1
    # the documented cases (the 192x160x256 eval case needs ~10 GB of RAM)
    python benchmarks/benchmark_network.py --threads 2 --repeats 3 --json benchmarks/network_cpu.json
    # the shipped width, contiguous vs channels_last weights
    python benchmarks/benchmark_network.py --channels 8,16,32,64,128 --cases train:64x64x64:1:2 eval:64x64x64:1 \\
        --memory_formats contiguous channels_last --threads 2 --json benchmarks/network_w8_cpu.json
    # the shipped model (no deep supervision): where a training step's and an inference's time goes
    python benchmarks/benchmark_network.py --channels 8,16,32,64,128 --deep_supervision False \\
        --cases train:64x64x64:1:2 eval:64x64x64:1 --memory_formats channels_last --threads 2 --profile 12 \\
        --json benchmarks/network_w8_profile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ["eval:64x64x64:1", "eval:192x160x256:3", "lowmem:192x160x256:3", "train:64x64x64:1"]


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("eval", "lowmem", "train"):
        raise argparse.ArgumentTypeError(f"case must be MODE:HxWxD:C[:B] with MODE eval, lowmem or train, got {text!r}")
    size = tuple(int(s) for s in parts[1].lower().split("x"))
    if len(size) != 3:
        raise argparse.ArgumentTypeError(f"size must be HxWxD, got {parts[1]!r}")
    batch = int(parts[3]) if len(parts) == 4 else 1
    return {"mode": parts[0], "size": size, "in_channels": int(parts[2]), "batch": batch}


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def make_steps(case: dict, net, precisions: list[str]) -> dict:
    """The timed step of a case on ``net``, one per precision (the configs' ``--precision``: float32 is the
    network as it is, bfloat16 its passes under autocast), all on one random input and, in train mode, one
    Adam optimiser, so that steps of several precisions can alternate on the same weights."""
    import torch

    from scripts.inferers import LowMemoryRegistrationInferer, RegistrationInferer
    from scripts.losses import SymmetricRegistrationLoss

    b, c, size = case["batch"], case["in_channels"], case["size"]
    image = torch.rand(b, 2 * c, *size)
    if case["mode"] == "train":
        net.train()
        loss_fn = SymmetricRegistrationLoss(similarity="lncc", num_labels=3)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        batch = {
            "moving_image": image[:, :c],
            "fixed_image": image[:, c:],
            "moving_label": torch.randint(0, 3, (b, 1, *size)),
            "fixed_label": torch.randint(0, 3, (b, 1, *size)),
        }
    else:
        net.eval()

    def step_for(precision: str):
        if case["mode"] == "lowmem":
            inferer = LowMemoryRegistrationInferer(slab_voxels=2**21, dtype=precision)
        else:
            inferer = RegistrationInferer(dtype=precision)

        def step():
            if case["mode"] == "train":
                opt.zero_grad(set_to_none=True)
                loss_fn(inferer(image, net), batch).backward()
                opt.step()
            else:
                with torch.no_grad():
                    inferer(image, net)

        return step

    return {p: step_for(p) for p in precisions}


def worker(
    case: dict,
    channels: tuple[int, ...],
    repeats: int,
    warmup: int,
    threads: int,
    memory_format: str = "contiguous",
    deep_supervision: bool = True,
    profile: int = 0,
    precision: str = "float32",
) -> dict:
    """One case in this (fresh) process; returns the measurements."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from scripts.networks import SpatialGradientRegNet

    torch.manual_seed(0)
    net = SpatialGradientRegNet(in_channels=case["in_channels"], channels=channels, deep_supervision=deep_supervision)
    if memory_format == "channels_last":  # the weights only, as train.json / inference.json --channels_last
        net = net.to(memory_format=torch.channels_last_3d)
    n_params = sum(p.numel() for p in net.parameters())
    step = make_steps(case, net, [precision])[precision]
    rss_model = rss_mb()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    top = []
    if profile:  # one more run under the profiler: where the time goes, by operator (self time)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops)
        top = [
            {
                "op": e.key,
                "calls": e.count,
                "self_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total,
            }
            for e in ops[:profile]
        ]
    return {
        **case,
        "size": list(case["size"]),
        "channels": list(channels),
        "memory_format": memory_format,
        "precision": precision,
        "parameters": n_params,
        "threads": threads,
        "warmup": warmup,
        "repeats": repeats,
        "time_median_s": statistics.median(times),
        "time_min_s": min(times),
        "peak_rss_mb": rss_mb(),
        "model_rss_mb": rss_model,
        "deep_supervision": deep_supervision,
        **({"profile_top": top} if top else {}),
    }


def run_case(case_text: str, args, memory_format: str, precision: str = "float32") -> dict:
    cmd = [
        sys.executable, __file__, "--worker", case_text, "--memory_formats", memory_format, "--precisions", precision,
        "--channels", ",".join(map(str, args.channels)),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--deep_supervision", str(args.deep_supervision), "--profile", str(args.profile),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"killed (signal {-proc.returncode})"])[-1]
        return {
            **parse_case(case_text),
            "memory_format": memory_format,
            "precision": precision,
            "error": last,
            "returncode": proc.returncode,
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict]) -> str:
    head = [
        "| mode | input (B x 2C x H x W x D) | weights | precision | parameters | median time (s) | min time (s) "
        "| peak RSS (MiB) | RSS after init (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in results:
        shape = f"{r['batch']} x {2 * r['in_channels']} x " + " x ".join(map(str, r["size"]))
        if "error" in r:
            rows.append(
                f"| {r['mode']} | {shape} | {r['memory_format']} | {r['precision']} | | failed: {r['error']} | | | |"
            )
            continue
        rows.append(
            f"| {r['mode']} | {shape} | {r['memory_format']} | {r.get('precision', 'float32')} | {r['parameters']:,} "
            f"| {r['time_median_s']:.2f} "
            f"| {r['time_min_s']:.2f} | {r['peak_rss_mb']:,.0f} | {r['model_rss_mb']:,.0f} |"
        )
    return "\n".join(head + rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODE:HxWxD:C[:B] (default: %(default)s)")
    parser.add_argument(
        "--channels",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(32, 64, 128, 256, 512),
        help="encoder channels per level, comma separated (default: the authors' 32,64,128,256,512)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument(
        "--memory_formats",
        nargs="+",
        choices=["contiguous", "channels_last"],
        default=["contiguous"],
        help="memory order of the weights; each case runs once per format (default: %(default)s)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32"],
        help="the network's passes as --precision in the configs (bfloat16: under autocast); each case runs once "
        "per precision (default: %(default)s)",
    )
    parser.add_argument(
        "--deep_supervision",
        type=lambda s: {"true": True, "false": False}[s.lower()],
        default=True,
        help="True (default: the authors' network) or False (the shipped hippocampus model)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="N > 0: one more run per case under torch.profiler, its top N operators"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    for c in args.cases + ([args.worker] if args.worker else []):
        try:
            parse_case(c)  # fail early on a typo
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))

    if args.worker:
        case = parse_case(args.worker)
        result = worker(
            case,
            args.channels,
            args.repeats,
            args.warmup,
            args.threads,
            args.memory_formats[0],
            args.deep_supervision,
            args.profile,
            args.precisions[0],
        )
        print(json.dumps(result))
        return 0

    import torch

    results = []
    for case in args.cases:
        for memory_format in args.memory_formats:
            for precision in args.precisions:
                print(f"running {case} ({memory_format} weights, {precision}) ...", file=sys.stderr, flush=True)
                results.append(run_case(case, args, memory_format, precision))
    print(
        f"SpatialGradientRegNet(channels={args.channels}) on CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s)), torch {torch.__version__}; {args.warmup} warm-up + {args.repeats} timed run(s) "
        "per case, each case in a fresh process.\n"
    )
    print(markdown(results))
    for r in results:
        if r.get("profile_top"):
            print(
                f"\n{r['mode']} {'x'.join(map(str, r['size']))} ({r['memory_format']}, {r['precision']}): "
                "self time by operator, one run"
            )
            for op in r["profile_top"]:
                print(f"  {op['op']:<40} {op['calls']:>5} calls {op['self_s']:8.3f} s {100 * op['share']:5.1f} %")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "command": shlex.join(
                ["python", "benchmarks/benchmark_network.py", *(sys.argv[1:] if argv is None else argv)]
            ),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
