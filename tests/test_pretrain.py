"""Pretraining (issue 5) from the command line on real hippocampus MRIs: a few steps of unsupervised
pretraining with pairs drawn within each cohort, then fine-tuning with train.json
--pretrained_ckpt carrying every weight over exactly, and a checkpoint of another architecture
refused before anything is written."""

import json
import re
from pathlib import Path

import pytest
import torch

from tests.test_bundle import SAMPLE, TINY, bundle, ok

VAL_ONE = ["--validate#pairs", "$scripts.learn2reg.pairs(@dataset_dir, 'registration_val', @num_val)[:1]"]


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two cohorts of 4 real MRIs each (the bundle's sample cases, labels not given), 1 epoch."""
    tmp = tmp_path_factory.mktemp("pretrain")
    images = sorted(str(p) for p in (SAMPLE / "imagesTr").glob("*.nii.gz"))
    cohorts = tmp / "cohorts.json"
    cohorts.write_text(
        json.dumps(
            [
                {"name": "first", "data": [{"image": p} for p in images[:4]]},
                {"name": "second", "data": [{"image": p} for p in images[4:]]},
            ]
        )
    )
    proc = ok(
        bundle(
            "--dataset_dir",
            str(SAMPLE),
            "--cohorts",
            str(cohorts),
            "--cache_dir",
            str(tmp / "cache"),
            "--ckpt_dir",
            str(tmp / "ckpt"),
            *TINY,
            "--batch_size",
            "2",
            "--num_workers",
            "0",
            "--max_epochs",
            "1",
            "--val_interval",
            "1",
            *VAL_ONE,
            configs=("train", "pretrain"),
        )
    )
    return tmp, proc


def test_unsupervised_pretraining_runs(pretrained):
    tmp, proc = pretrained
    log = proc.stdout + proc.stderr
    iterations = re.findall(r"Epoch: 1/1, Iter: \d+/(\d+) -- (.*)", log)
    assert iterations and iterations[0][0] == "4"  # 8 images, batch 2
    assert all("sim:" in terms and "smooth:" in terms and "dice:" not in terms for _, terms in iterations)
    ckpt = torch.load(tmp / "ckpt" / "checkpoint_epoch=1.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4
    # Preprocessed cases cached on disk (PersistentDataset), one file per image, not in memory.
    assert len(list((tmp / "cache").glob("*.pt"))) == 8


def _finetune(ckpt_dir: Path, pretrained_ckpt: Path, learning_rate: str) -> None:
    """One epoch (two steps) of fine-tuning on 4 sample cases from ``pretrained_ckpt``."""
    cases = "$scripts.learn2reg.training_cases(@dataset_dir, @num_val, exclude_val=False)[:4]"
    # fmt: off
    ok(bundle("--dataset_dir", str(SAMPLE), "--ckpt_dir", str(ckpt_dir), "--pretrained_ckpt", str(pretrained_ckpt),
              *TINY, "--learning_rate", learning_rate, "--batch_size", "2", "--num_workers", "0", "--max_epochs", "1",
              "--val_interval", "100", "--train#cases", cases, *VAL_ONE))
    # fmt: on


def test_pretrain_then_finetune_carries_weights_exactly(pretrained, tmp_path):
    """Fine-tuning with a zero learning rate must end with exactly the pretrained tensors: every
    weight was loaded (none left at its random initialisation) and nothing else changed them."""
    tmp, _ = pretrained
    source = torch.load(tmp / "ckpt" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    _finetune(tmp_path, tmp / "ckpt" / "checkpoint_epoch=1.pt", "0")
    tuned = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert tuned["trainer"]["iteration"] == 2  # it did train (two steps with lr 0)
    assert tuned["model"].keys() == source.keys()
    differ = [k for k in source if not torch.equal(source[k], tuned["model"][k])]
    assert not differ, differ[:3]
    # The control: with a learning rate the same run moves the weights.
    _finetune(tmp_path / "lr", tmp / "ckpt" / "model.pt", "0.001")
    moved = torch.load(tmp_path / "lr" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    assert any(not torch.equal(source[k], moved[k]) for k in source)


def test_checkpoint_of_another_architecture_is_refused(pretrained, tmp_path):
    tmp, _ = pretrained
    ckpt = tmp / "ckpt" / "checkpoint_epoch=1.pt"
    out = tmp_path / "out"
    proc = bundle(
        "--dataset_dir",
        str(SAMPLE),
        "--ckpt_dir",
        str(out),
        "--pretrained_ckpt",
        str(ckpt),
        "--channels",
        "[8, 16, 32, 64, 128]",
        "--max_epochs",
        "1",
        "--num_workers",
        "0",
    )
    assert proc.returncode != 0
    assert f"{ckpt}: was saved from another architecture or task" in proc.stderr
    assert "tensors of another shape" in proc.stderr
    assert not out.exists()
