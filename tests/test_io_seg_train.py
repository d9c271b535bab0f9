"""configs/io_seg_train.json: the segmentation network of segmentation-guided instance optimisation
(inference.json --io_similarity dice --io_seg_ckpt), trained as a bundle config on a Learn2Reg or MSD
dataset's training cases and validated on the subjects of its validation pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from scripts.weights import load_pretrained
from tests.test_bundle import SAMPLE, bundle, load, ok

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--io_seg_channels", "[4, 8, 16, 32]"]


def _val_dice(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"Metrics -- val_mean_dice: ([0-9.]+)", log)]


def test_trains_the_network_inference_loads_with_the_same_preprocessing():
    train, infer = load("io_seg_train"), load("inference")
    assert train["network_def"] == infer["io_segmenter_def"]
    for key in ("preprocessing", "spatial_size", "in_channels", "num_labels", "io_seg_channels", "device"):
        assert train[key] == infer[key], f"configs/io_seg_train.json and configs/inference.json disagree on {key}"


@pytest.mark.slow
def test_the_shipped_segmenter_scores_on_the_validation_subjects(tmp_path):
    """Validation as the config runs it (argmax, MeanDice of head and tail) on the 4 sample subjects of
    the validation pairs, with the shipped weights unchanged (learning rate 0): the config reads, labels
    and scores images as the network was trained (a wrong preprocessing or label order scores far lower).
    Training touched the 4 other sample cases only; models/ is not written."""
    shipped = (ROOT / "models" / "seg_hippocampus.pt").read_bytes()
    proc = ok(
        bundle(
            "--dataset_dir", str(SAMPLE), "--ckpt_dir", str(tmp_path / "seg"), "--max_epochs", "1",
            "--val_interval", "1", "--learning_rate", "0", "--pretrained_ckpt", "models/seg_hippocampus.pt",
            configs=("io_seg_train",),
        )
    )  # fmt: skip
    (dice,) = _val_dice(proc.stdout + proc.stderr)
    assert dice > 0.83, dice
    assert (ROOT / "models" / "seg_hippocampus.pt").read_bytes() == shipped


@pytest.mark.slow
def test_a_trained_network_guides_inference(tmp_path):
    """Two epochs at a tiny width on the 4 sample training cases: the best-validation model.pt and the
    resumable checkpoint are written under ckpt_dir, a run resumed from its epoch-1 checkpoint ends epoch 2
    with the same weights, and inference.json runs the instance optimisation with model.pt as its segmenter
    (recorded in the manifest)."""
    run = tmp_path / "seg"
    proc = ok(
        bundle(
            "--dataset_dir", str(SAMPLE), "--ckpt_dir", str(run), "--max_epochs", "2", "--val_interval", "1", *TINY,
            configs=("io_seg_train",),
        )
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert len(_val_dice(log)) == 2 and "loss" in log
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_epoch=2.pt", "logs", "model.pt"]
    assert list((run / "logs").glob("events.out.tfevents.*"))
    checkpoint = torch.load(run / "checkpoint_epoch=2.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)

    # stopped after epoch 1 and resumed: epoch 2 ends with the same weights as the run without a stop
    common = ["--dataset_dir", str(SAMPLE), "--ckpt_dir", str(tmp_path / "seg2"), "--val_interval", "1", *TINY]
    ok(bundle(*common, "--max_epochs", "1", configs=("io_seg_train",)))
    resume = ["--resume_ckpt", str(tmp_path / "seg2" / "checkpoint_epoch=1.pt")]
    ok(bundle(*common, "--max_epochs", "2", *resume, configs=("io_seg_train",)))
    resumed = torch.load(tmp_path / "seg2" / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in checkpoint["model"].items())

    from monai.networks.nets import UNet

    net = UNet(3, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1, norm="instance")
    load_pretrained(net, str(run / "model.pt"))  # a plain state dict of inference.json's segmenter

    out = tmp_path / "out"
    ok(
        bundle(
            "--output_dir", str(out), "--figures", "False", "--io_steps", "2", "--io_similarity", "dice",
            "--io_seg_ckpt", str(run / "model.pt"), *TINY,
            configs=("inference",),
        )
    )  # fmt: skip
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["io_seg_ckpt"] == str(run / "model.pt") and settings["io_similarity"] == "dice"
    assert len(list(out.glob("disp_*.nii.gz"))) == 4
