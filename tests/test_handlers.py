"""Tests of scripts/handlers.py: RegistrationResults completes a staged output folder (timing.csv,
manifest.json) and publishes it whole, or removes it when the run fails."""

import csv
import json
import os

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from scripts.files import sha256_of, staging_path
from scripts.handlers import RegistrationResults


def run(tmp_path, fail_at=None, overwrite=False):
    out = tmp_path / "out"
    staging = staging_path(str(out))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")

    def step(engine, batch):
        if engine.state.iteration == fail_at:
            raise RuntimeError("out of memory on pair 2")
        name = f"disp_{batch[0]['fixed_id']}_0000_{batch[0]['moving_id']}_0000.nii.gz"
        with open(os.path.join(staging, name), "w") as f:  # what SaveImaged does in the postprocessing
            f.write(name)
        return [{"seconds": 0.25 * engine.state.iteration}]

    engine = Engine(step)
    RegistrationResults(staging, str(out), overwrite, manifest={"checkpoint": str(ckpt), "channels": [8, 16]}).attach(
        engine
    )
    image = lambda i: MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/d/img_{i}.nii.gz"})  # noqa: E731
    batches = [
        [{"fixed_id": f"000{i}", "moving_id": f"000{i + 1}", "fixed_image": image(i), "moving_image": image(i + 1)}]
        for i in range(3)
    ]
    engine.run(batches, max_epochs=1)
    return out, staging, ckpt


def test_a_complete_run_publishes_timings_and_manifest(tmp_path):
    out, staging, ckpt = run(tmp_path)
    assert not os.path.exists(staging)
    rows = list(csv.reader(open(out / "timing.csv")))
    assert rows == [
        ["fixed_id", "moving_id", "seconds"],
        ["0000", "0001", "0.2500"],
        ["0001", "0002", "0.5000"],
        ["0002", "0003", "0.7500"],
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"] == {"path": str(ckpt), "sha256": sha256_of(str(ckpt))}
    assert manifest["settings"] == {"channels": [8, 16]}
    assert manifest["pairs"][1] == {
        "fixed_id": "0001",
        "moving_id": "0002",
        "fixed_image": "/d/img_1.nii.gz",
        "moving_image": "/d/img_2.nii.gz",
    }
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert all(manifest["files"][n] == sha256_of(str(out / n)) for n in manifest["files"])


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="pair 2"):
        run(tmp_path, fail_at=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_complete_folder_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old run")
    with pytest.raises(FileExistsError, match="filled by something else"):
        run(tmp_path)
    assert os.listdir(tmp_path / "out") == ["old.txt"] and not list(tmp_path.glob(".tmp-*"))
    out, _, _ = run(tmp_path, overwrite=True)
    assert "old.txt" not in os.listdir(out) and (out / "manifest.json").is_file()
