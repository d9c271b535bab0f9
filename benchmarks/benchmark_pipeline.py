"""Where the time of configs/inference.json goes, stage by stage, per pair; and the whole command.

Per pair, with the config's own components (``ConfigParser`` on configs/inference.json, so the
measured pipeline is the shipped one): reading (``LoadImaged`` + ``EnsureChannelFirstd`` of both
images and label maps), preprocessing (the rest of ``preprocessing``), the network (the forward pass
without the integration), the integration (cumulative sum), warping (image trilinear, label map
nearest), back to the fixed grid (``ToImageGridd``), writing each output (``SaveImaged``: field,
warped image, warped label map) and the figure (``SavePairFigured``). The median over the pairs is
reported for each stage and each variant (``--variants``: precision x memory format).

Then the whole command, ``python -m monai.bundle run --config_file configs/inference.json
--figures False`` on the same pairs in a fresh process: its wall time (imports, checks, loading the
weights, writing included) and the median of its ``timing.csv``.

    python benchmarks/benchmark_pipeline.py --dataset_dir runs/HippocampusMR --threads 2 \\
        --json benchmarks/pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["float32:channels_last", "float32:contiguous", "bfloat16:channels_last"]


def stage_times(dataset_dir: str, pairs_selection: str, num_pairs: int, precision: str, channels_last: bool) -> dict:
    """Median seconds per pair of every stage, for one precision and memory format."""
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        return _stage_times(out, dataset_dir, pairs_selection, num_pairs, precision, channels_last)


def _stage_times(out: str, dataset_dir: str, pairs_selection: str, num_pairs: int, precision: str, channels_last: bool):
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    sys.path.insert(0, str(ROOT))
    from scripts.deformation import gradient_to_ddf, warp_image, warp_labels_nearest
    from scripts.networks import logits_to_gradient

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(ROOT),
            "dataset_dir": dataset_dir,
            "pairs_selection": pairs_selection,
            "output_dir": out,
            "precision": precision,
            "channels_last": channels_last,
        }
    )
    pairs = parser.get_parsed_content("pairs")[:num_pairs]
    pre = parser.get_parsed_content("preprocessing")
    read, rest = Compose(pre.transforms[:2]), Compose(pre.transforms[2:])
    net = parser.get_parsed_content("network").eval()
    net.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), map_location="cpu", weights_only=True))
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing").transforms
    figure, to_grid, save_float, save_label = post[0], post[1], post[3], post[4]
    stages: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        stages.setdefault(name, []).append(time.perf_counter() - start)
        return result

    for pair in pairs:
        cases = {
            r: {k: pair[f"{r}_{k}"] for k in ("image", "label") if f"{r}_{k}" in pair} for r in ("fixed", "moving")
        }
        loaded = timed("read", lambda: {r: read(c) for r, c in cases.items()})
        ready = timed("preprocess", lambda: {r: rest(c) for r, c in loaded.items()})
        fixed, moving = ready["fixed"]["image"][None], ready["moving"]["image"][None]
        image = torch.cat([moving, fixed], 1).as_tensor()
        with torch.no_grad():
            ddf = timed("network + integration", inferer, image, net)
            # the integration alone, on a field of the same size (the network's last step)
            g = logits_to_gradient(torch.randn(1, 3, *image.shape[2:]))
            timed("integration", gradient_to_ddf, g)
            warped = timed("warp image", warp_image, moving, ddf)
            warped_label = timed("warp label map", warp_labels_nearest, ready["moving"]["label"][None].long(), ddf)
        item = {
            "fixed_id": pair["fixed_id"],
            "moving_id": pair["moving_id"],
            "fixed_image": ready["fixed"]["image"],
            "moving_image": ready["moving"]["image"],
            "ddf": ddf[0],
            "warped_image": warped[0],
            "warped_label": warped_label[0],
            "label": torch.nn.functional.one_hot(ready["fixed"]["label"][0].long(), 3).permute(3, 0, 1, 2),
        }
        timed("figure", figure, dict(item))
        item = timed("back to the fixed grid", to_grid, item)
        for key in ("ddf", "warped_image"):
            timed(f"write {key}", save_float, {key: item[key]})
        timed("write warped_label", save_label, {"warped_label": item["warped_label"]})
    medians = {k: statistics.median(v) for k, v in stages.items()}
    medians["network"] = medians["network + integration"] - medians["integration"]
    medians["register (network, integration, warping)"] = (
        medians["network + integration"] + medians["warp image"] + medians["warp label map"]
    )
    return {"precision": precision, "channels_last": channels_last, "pairs": len(pairs), "median_seconds": medians}


def whole_command(dataset_dir: str, pairs_selection: str, threads: int, extra: list[str]) -> dict:
    """Wall time of the real command (a fresh process) and the median of its timing.csv."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        return _whole_command(Path(tmp) / "out", dataset_dir, pairs_selection, threads, extra)


def _whole_command(out: Path, dataset_dir: str, pairs_selection: str, threads: int, extra: list[str]) -> dict:
    dataset_dir = os.path.relpath(dataset_dir, ROOT)  # the recorded command holds no machine path
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--dataset_dir", dataset_dir, "--pairs_selection", pairs_selection, "--output_dir", str(out),
           "--figures", "False", *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"command": " ".join(cmd[1:]), "error": proc.stderr.strip().splitlines()[-1]}
    rows = (out / "timing.csv").read_text().splitlines()[1:]
    seconds = [float(r.split(",")[2]) for r in rows]
    return {
        "command": "python " + " ".join(cmd[1:]).replace(str(out), "<tmp>"),
        "pairs": len(rows),
        "wall_seconds": wall,
        "timing_csv_median": statistics.median(seconds),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=str(ROOT / "sample_data" / "HippocampusMR"))
    parser.add_argument("--pairs_selection", default="registration_val")
    parser.add_argument("--num_pairs", type=int, default=40, help="pairs for the per-stage medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="PRECISION:channels_last|contiguous")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results = []
    for variant in args.variants:
        precision, layout = variant.split(":")
        print(f"stages: {variant} ...", file=sys.stderr, flush=True)
        results.append(
            stage_times(args.dataset_dir, args.pairs_selection, args.num_pairs, precision, layout == "channels_last")
        )
    print("whole command ...", file=sys.stderr, flush=True)
    command = whole_command(args.dataset_dir, args.pairs_selection, args.threads, [])
    stages = list(results[0]["median_seconds"])
    print("| stage (median s per pair) | " + " | ".join(args.variants) + " |")
    print("|---|" + "---|" * len(args.variants))
    for s in stages:
        print(f"| {s} | " + " | ".join(f"{r['median_seconds'][s]:.4f}" for r in results) + " |")
    print(json.dumps(command, indent=1))
    if args.json:
        meta = {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": args.threads,
            "dataset_dir": os.path.relpath(args.dataset_dir, ROOT),
        }
        args.json.write_text(json.dumps({"meta": meta, "stages": results, "command": command}, indent=1) + "\n")
    return 0 if "error" not in command else 1


if __name__ == "__main__":
    sys.exit(main())
