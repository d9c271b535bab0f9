"""Bundle tooling (issue 6): ``verify_net_in_out``, TorchScript export with ``ckpt_export`` and inference
from the exported ``model.ts`` alone. Weight downloads and checkpoint loading: tests/test_weights.py;
checkpoint averaging: tests/test_averaging.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import forkserver
import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return forkserver.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# --------------------------------------------------------------------------------------------------
# verify_net_in_out, ckpt_export (trace) and inference from model.ts alone


def _config_network(channels=None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    if channels is not None:
        parser["channels"] = channels
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("preprocessing")


def test_verify_net_in_out_passes():
    proc = ok(
        run(
            "-m",
            "monai.bundle",
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
        )
    )
    assert "verified with no error" in proc.stdout + proc.stderr


def test_ckpt_export_torchscript_matches_eager_and_runs_inference_alone(tmp_path):
    torch.manual_seed(0)
    net, preprocessing = _config_network()  # the configs' default network (the shipped architecture)
    with torch.no_grad():  # away from the zero-initialised identity head, so the DDF is not trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = tmp_path / "model.pt"
    torch.save(net.state_dict(), state)
    ts = tmp_path / "model.ts"
    # scripted, the Model Zoo's default (tests/test_networks.py also checks tracing)
    ok(
        run(
            "-m",
            "monai.bundle",
            "ckpt_export",
            "network_def",
            "--filepath",
            str(ts),
            "--ckpt_file",
            str(state),
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
            "--key_in_ckpt",
            "",
        )
    )

    # A real sample pair, preprocessed as inference does.
    pair = json.loads((SAMPLE / "HippocampusMR_dataset.json").read_text())["registration_val"][0]
    imgs = [preprocessing({"image": str(SAMPLE / pair[r])})["image"].as_tensor() for r in ("moving", "fixed")]
    image = torch.cat(imgs)[None]
    net.eval()
    exported = torch.jit.load(str(ts), map_location="cpu")
    extra = {"metadata.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    with torch.no_grad():
        eager = net(image)
        scripted = exported(image)
    assert eager.shape == scripted.shape == (1, 3, 64, 64, 64)
    assert eager.abs().max() > 0.1, "the test network is the identity; the comparison would be vacuous"
    assert (eager - scripted).abs().max() <= 1e-4

    # Inference from model.ts alone: the network replaced by the TorchScript file, no checkpoint, the .pt deleted.
    state.unlink()
    out = tmp_path / "out"
    ok(
        run(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--network_def",
            f"$torch.jit.load('{ts}', map_location=@device)",  # noqa: B907 (a config expression)
            "--ckpt_path",
            "",
            "--output_dir",
            str(out),
            "--figures",
            "False",
        )
    )
    f_id, m_id = Path(pair["fixed"]).name[14:18], Path(pair["moving"]).name[14:18]
    disp = np.asarray(nib.load(out / f"disp_{f_id}_0000_{m_id}_0000.nii.gz").dataobj)
    # 1e-3 voxel: inference runs the weights in channels_last_3d order (another summation order)
    assert np.abs(disp - eager[0].permute(1, 2, 3, 0).numpy()).max() <= 1e-3
