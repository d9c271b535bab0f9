"""Kill and resume (issue 6): a tiny training run on real sample cases, SIGKILLed in the middle of
epoch 2 and resumed from its last checkpoint, ends with exactly the weights of an uninterrupted run
with the same seed; the same seed twice gives the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import forkserver
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"
EPOCHS = 2
CASES = 2  # iterations per epoch with batch 1
WORKERS = 1  # a DataLoader worker process, as the configs use (2 there)


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


def _args(tmp: Path, seed: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/train.json",
        "--dataset_dir",
        str(SAMPLE),
        "--ckpt_dir",
        str(tmp / "ckpt"),
        "--log_dir",
        str(tmp / "logs"),
        "--channels",
        "[4, 8, 16, 32, 64]",
        "--batch_size",
        "1",
        "--num_workers",
        str(WORKERS),
        "--max_epochs",
        str(EPOCHS),
        "--val_interval",
        "1000",
        "--seed",
        str(seed),
        # The sample cases are all validation cases: train on 3 of them here.
        "--train#cases",
        f"$scripts.learn2reg.training_cases(@dataset_dir, @num_val, exclude_val=False)[:{CASES}]",
        "--validate#pairs",
        "$scripts.learn2reg.pairs(@dataset_dir, 'registration_val', @num_val)[:1]",
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(tmp: Path, seed: int, *extra: str) -> dict:
    args = _args(tmp, seed, *extra)
    proc = forkserver.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {**_final(tmp), "log": proc.stdout + proc.stderr}


def _final(tmp: Path) -> dict:
    ckpt = tmp / "ckpt" / f"checkpoint_epoch={EPOCHS}.pt"
    assert ckpt.exists(), sorted(p.name for p in (tmp / "ckpt").iterdir())
    return torch.load(ckpt, weights_only=True)


def _assert_identical(a: dict, b: dict, what: str) -> None:
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{what}: {len(differ)} of {len(a['model'])} tensors differ, e.g. {differ[:3]}"
    # Adam's moments too: the resumed run continues exactly where the other one was.
    for (i, sa), (j, sb) in zip(
        sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items()), strict=True
    ):
        assert i == j and all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa), what
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == EPOCHS * CASES


def _run_and_kill_in_epoch_2(tmp: Path, seed: int) -> str:
    """Starts training, SIGKILLs it once epoch 2 has run an iteration (checkpoint_epoch=1.pt
    written, epoch 2 not finished). Returns the output so far."""
    proc = subprocess.Popen(
        _args(tmp, seed), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    lines: list[str] = []
    reached = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if f"Epoch: 2/{EPOCHS}, Iter: 1/{CASES}" in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while not reached.is_set() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert reached.is_set(), "".join(lines)[-5000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        reader.join(10)
    assert proc.returncode == -signal.SIGKILL
    return "".join(lines)


def test_sigkill_resume_is_exact(tmp_path):
    """An uninterrupted run, and a run with the same seed SIGKILLed in epoch 2 then resumed from its last
    checkpoint: the same weights and Adam state (so the same seed also gives the same weights). With a
    DataLoader worker process (the configs default to 2): the shuffled order and the worker seeds of
    epoch 2 must not depend on what epoch 1 left in the random generators."""
    seed = 7
    first = _train(tmp_path / "first", seed, "--keep_checkpoints", "2")
    kept = sorted(p.name for p in (tmp_path / "first" / "ckpt").glob("checkpoint_epoch=*.pt"))
    assert kept == [f"checkpoint_epoch={e}.pt" for e in range(1, EPOCHS + 1)]  # --keep_checkpoints 2

    killed = tmp_path / "killed"
    log = _run_and_kill_in_epoch_2(killed, seed)
    saved = sorted(p.name for p in (killed / "ckpt").iterdir())
    assert saved == ["checkpoint_epoch=1.pt"], (saved, log[-3000:])  # the default keeps the last one
    # Epoch 2 does change the weights, so the comparisons are not vacuous.
    epoch1 = torch.load(killed / "ckpt" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    assert all(not torch.equal(epoch1[k], first["model"][k]) for k in epoch1 if k.endswith("weight"))
    resumed = _train(killed, seed, "--resume_ckpt", str(killed / "ckpt" / "checkpoint_epoch=1.pt"))
    text = resumed["log"]
    assert f"Epoch: 2/{EPOCHS}" in text and f"Epoch: 1/{EPOCHS}" not in text, "resume must continue at epoch 2"
    _assert_identical(first, resumed, "SIGKILL in epoch 2 + --resume_ckpt checkpoint_epoch=1.pt vs uninterrupted")
