"""Unsupervised pretraining then fine-tuning versus training from scratch, same fine-tuning budget
(docs/ct.md), on the hippocampus data.

Three runs of the bundle's own configs, one after the other:

1. ``pretrain``: configs/train.json + configs/pretrain.json, ``--pretrain_epochs`` epochs of
   unsupervised pretraining (LNCC + smoothness, no labels) on the TRAINING images only (the
   validation cases are held out, as in every run);
2. ``finetune``: configs/train.json with ``--pretrained_ckpt`` = the last pretraining checkpoint,
   ``--epochs`` epochs with labels;
3. ``scratch``: configs/train.json from a random initialisation, the same ``--epochs`` epochs,
   seed, pairs and settings.

Validation Dice (and HD95) after every epoch, from each run's log, go to ``--json``.

    python -m scripts.convert --msd_dir ../shared/data/hippocampus_msd --out_dir runs/HippocampusMR --num_val 40
    python benchmarks/pretrain_finetune.py --dataset_dir runs/HippocampusMR --work_dir runs/pretrain_demo \\
        --pretrain_epochs 4 --epochs 4 --json benchmarks/pretrain_finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = re.compile(r"Epoch\[(\d+)\] Metrics -- val_hd95: ([\d.naif]+) val_mean_dice: ([\d.]+)")


def run(name: str, configs: list[str], args: list[str], work: Path) -> dict:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    config = configs[0] if len(configs) == 1 else str(configs)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        config,
        "--ckpt_dir",
        str(out),
        "--log_dir",
        str(out / "logs"),
        *args,
    ]
    print(" ".join(cmd), flush=True)
    start = time.time()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    text = (out / "train.log").read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out / 'train.log'}")
    epochs = [{"epoch": int(e), "val_hd95": float(h), "val_dice": float(d)} for e, h, d in METRICS.findall(text)]
    # recorded relative to the bundle, without this machine's paths
    command = " ".join(cmd).replace(sys.executable, "python").replace(f"{ROOT}/", "")
    return {"command": command, "minutes": round(seconds / 60, 1), "val_per_epoch": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default="runs/HippocampusMR")
    parser.add_argument("--work_dir", default="runs/pretrain_demo")
    parser.add_argument("--pretrain_epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--channels", default="[8, 16, 32, 64, 128]")
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    work = Path(a.work_dir).resolve()
    common = [
        "--dataset_dir",
        str(Path(a.dataset_dir).resolve()),
        "--channels",
        a.channels,
        "--batch_size",
        "2",
        "--num_workers",
        "1",
        "--val_interval",
        "1",
        "--learning_rate",
        "0.0005",
        "--aug_prob",
        "0",
        "--seed",
        "0",
    ]
    results = {"settings": vars(a), "machine": f"{platform.node()} {os.cpu_count()} cores"}
    results["pretrain"] = run(
        "pretrain",
        ["configs/train.json", "configs/pretrain.json"],
        [*common, "--max_epochs", str(a.pretrain_epochs)],
        work,
    )
    ckpt = work / "pretrain" / f"checkpoint_epoch={a.pretrain_epochs}.pt"
    results["finetune"] = run(
        "finetune",
        ["configs/train.json"],
        [*common, "--max_epochs", str(a.epochs), "--pretrained_ckpt", str(ckpt)],
        work,
    )
    results["scratch"] = run("scratch", ["configs/train.json"], [*common, "--max_epochs", str(a.epochs)], work)
    for name in ("pretrain", "finetune", "scratch"):
        dice = [round(e["val_dice"], 4) for e in results[name]["val_per_epoch"]]
        print(f"{name:9s} {results[name]['minutes']:6.1f} min  val Dice per epoch {dice}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
