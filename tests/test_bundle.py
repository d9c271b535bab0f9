"""End-to-end runs of the bundle's real configs on real data, as a user runs them
(``python -m monai.bundle run ...`` in a subprocess), plus config consistency checks."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import forkserver
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import HIPPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"
# The Model Zoo's metadata schema, the version configs/metadata.json names, stored so that it is checked
# offline (source: see docs/release.md), and the sha256 of that copy.
SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
TINY = ["--channels", "[4, 8, 16, 32, 64]"]  # a tiny width keeps training runs to seconds


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


def bundle(
    *args: str, configs=("train",), cwd=ROOT, timeout=600, env=None, python=sys.executable
) -> subprocess.CompletedProcess:
    files = [f"configs/{c}.json" for c in configs]
    config = files[0] if len(files) == 1 else repr(files)
    cmd = [str(python), "-m", "monai.bundle", "run", "--config_file", config, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return forkserver.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def load(name: str) -> dict:
    return json.loads((ROOT / "configs" / f"{name}.json").read_text())


def test_train_and_inference_configs_share_network_and_preprocessing():
    train, infer = load("train"), load("inference")
    for key in (
        "network_def",
        "preprocessing",
        "spatial_size",
        "in_channels",
        "num_labels",
        "channels",
        "deep_supervision",
        "activation",
        "decoder_residual",
        "device",
    ):
        assert train[key] == infer[key], f"configs/train.json and configs/inference.json disagree on {key}"


def test_metadata_matches_configs():
    meta, infer = load("metadata"), load("inference")
    for key in (
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "name",
        "intended_use",
        "data_source",
        "network_data_format",
        "references",
    ):
        assert key in meta, key
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 2 * infer["in_channels"]
    assert fmt["outputs"]["pred"]["num_channels"] == 3
    assert fmt["inputs"]["image"]["spatial_shape"] == infer["spatial_size"]
    assert meta["version"] in meta["changelog"]
    label_def = fmt["outputs"]["pred"]["label_def"]
    assert len(label_def) == infer["num_labels"]
    sample_labels = json.loads((SAMPLE / "HippocampusMR_dataset.json").read_text())["labels"]
    sample_labels = sample_labels.get("0", sample_labels)  # Learn2Reg nests the names per modality
    assert {k: v.lower() for k, v in sample_labels.items()} == {k: v.lower() for k, v in label_def.items()}


def _requirements(name: str) -> dict[str, Requirement]:
    """The requirements listed in ``name`` (a pip requirements file of the bundle root) by package name."""
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def test_requirements_metadata_and_tested_versions_agree():
    """requirements.txt (ranges) and metadata.json's required_packages_version list the same packages and
    ranges; the versions CI tests (constraints.txt) lie in those ranges, and metadata.json's monai, torch
    and numpy versions (which the Model Zoo installs exactly) are the tested ones."""
    meta = load("metadata")
    reqs = _requirements("requirements.txt")
    tested = {name: next(iter(r.specifier)).version for name, r in _requirements("constraints.txt").items()}
    assert all(
        len(r.specifier) == 1 and next(iter(r.specifier)).operator == "=="
        for r in _requirements("constraints.txt").values()
    ), "constraints.txt: exact versions (==) only"
    for key, package in (("monai_version", "monai"), ("pytorch_version", "torch"), ("numpy_version", "numpy")):
        assert tested[package] == meta[key], f"metadata.json {key} {meta[key]} != constraints.txt {tested[package]}"
    for name, req in reqs.items():
        assert name in tested, f"constraints.txt: no tested version of {name}"
        assert req.specifier.contains(
            tested[name], prereleases=True
        ), f"constraints.txt: {name}=={tested[name]} is outside requirements.txt {name}{req.specifier}"
    listed = meta["required_packages_version"]
    for name, spec in listed.items():  # the Model Zoo's CI reads a bare version as ==, an operator as a range
        assert spec.strip()[:1] in tuple("<>=!~"), f"metadata.json required_packages_version {name}: {spec!r}"
    assert {canonicalize_name(n): SpecifierSet(v) for n, v in listed.items()} == {
        n: r.specifier for n, r in reqs.items() if n not in ("monai", "torch", "numpy")
    }, "metadata.json required_packages_version and requirements.txt disagree"
    # MONAI 1.6 reads optional_packages_version as a deprecated name and puts it IN PLACE OF
    # required_packages_version (ConfigParser.read_meta): both together lose the required list.
    assert "optional_packages_version" not in meta
    assert "jsonschema" in _requirements("requirements-dev.txt"), "the metadata schema test needs jsonschema"


def test_metadata_validates_offline_against_the_model_zoo_schema(tmp_path):
    """MONAI's ``verify_metadata``, the Model Zoo's schema check, on the stored copy of the schema."""
    from monai.bundle import verify_metadata

    meta = load("metadata")
    assert meta["schema"].rsplit("/", 1)[-1] == SCHEMA.name, f"metadata.json names {meta['schema']}: store a copy"
    # present with this hash, verify_metadata reads it; with another, it stops (it never downloads over it)
    assert SCHEMA.is_file()
    stored = {"filepath": str(SCHEMA), "hash_val": SCHEMA_SHA256, "hash_type": "sha256"}
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), **stored)
    # the check is real: a metadata file the schema does not allow is refused
    no_authors = {k: v for k, v in meta.items() if k != "authors"}
    text_range = json.loads(json.dumps(meta))
    text_range["network_data_format"]["outputs"]["pred"]["value_range"] = ["unbounded"]
    for broken in (no_authors, text_range):
        path = tmp_path / "metadata.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata(meta_file=str(path), **stored)


def test_metadata_eval_metrics_are_the_documented_results_of_the_shipped_weights():
    """metadata.json's eval_metrics are the shipped weights' row of the Results table of docs/README.md."""
    lines = (ROOT / "docs" / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| 40 validation pairs |"))  # Results table
    header, table = lines[start], list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    row = next(line for line in table if "shipped `models/model.pt`" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(columns, (c.strip(" *") for c in row.strip("|").split("|")), strict=True))
    documented = {
        "val_mean_dice": "Dice",
        "val_dice30": "Dice30",
        "val_hd95_voxels": "HD95 (voxels)",
        "val_sdlogj": "SDlogJ (official)",
    }
    assert load("metadata")["eval_metrics"] == {
        key: float(cells[column]) for key, column in documented.items()
    }, "configs/metadata.json eval_metrics differ from the shipped weights' row of docs/README.md Results"


@pytest.mark.parametrize(
    "config, workflow_type, outputs",
    [("train", "train", ("ckpt_dir", "log_dir")), ("inference", "infer", ("output_dir",))],
)
def test_monai_workflow_properties_are_complete(tmp_path, config, workflow_type, outputs):
    """MONAI's own check of the keys other applications use (``check_properties``): none missing or wrong.
    (``create_workflow`` runs the config's ``initialize``: its output folders go to ``tmp_path``.)"""
    from monai.bundle import create_workflow

    workflow = create_workflow(
        config_file=str(ROOT / "configs" / f"{config}.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(ROOT),
        **{key: str(tmp_path / key) for key in outputs},
    )
    assert not workflow.check_properties()


def tiny_training(bundle_root) -> list[str]:
    """train.json options for a run of seconds on real MSD cases: the tiny width, 4 training cases in batches
    of 2, 2 validation pairs after every epoch, everything written under ``bundle_root``."""
    return [
        "--dataset_dir",
        str(HIPPO),
        "--bundle_root",
        str(bundle_root),
        "--num_workers",
        "0",
        "--batch_size",
        "2",
        "--val_interval",
        "1",
        *TINY,
        "--train#cases",
        "$scripts.learn2reg.training_cases(@dataset_dir, @num_val)[:4]",
        "--validate#pairs",
        "$scripts.learn2reg.pairs(@dataset_dir, 'registration_val', @num_val)[:2]",
    ]


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"needs {HIPPO} (BUNDLE_TEST_DATA)")
def test_train_one_epoch(tmp_path):
    """One real epoch on real MSD cases, with validation. With the default ckpt_dir the run writes to
    <bundle_root>/runs/train, never over the shipped models/model.pt (resuming: tests/test_resume.py)."""
    shipped = (ROOT / "models" / "model.pt").read_bytes()
    run = tmp_path / "runs" / "train"
    proc = ok(bundle(*tiny_training(tmp_path), "--max_epochs", "1"))
    log = proc.stdout + proc.stderr
    for term in ("loss", "sim", "smooth", "dice", "val_mean_dice", "val_hd95"):
        assert term in log, term
    saved = sorted(p.name for p in run.iterdir())
    assert "model.pt" in saved and "checkpoint_epoch=1.pt" in saved, saved
    state = torch.load(run / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state), "model.pt must be a plain state dict"
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert (ROOT / "models" / "model.pt").read_bytes() == shipped
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"needs {HIPPO} (BUNDLE_TEST_DATA)")
def test_ddp_two_processes_one_epoch(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
        "--dataset_dir",
        str(HIPPO),
        "--ckpt_dir",
        str(tmp_path / "ckpt"),
        "--log_dir",
        str(tmp_path / "logs"),
        "--num_workers",
        "0",
        "--batch_size",
        "1",
        "--max_epochs",
        "1",
        "--val_interval",
        "1",
        *TINY,
        "--train#cases",
        "$scripts.learn2reg.training_cases(@dataset_dir, @num_val)[:4]",
        "--validate#pairs",
        "$scripts.learn2reg.pairs(@dataset_dir, 'registration_val', @num_val)[:2]",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = proc.stdout + proc.stderr
    # 4 cases over 2 ranks with batch 1: 2 iterations per rank, logged by rank 0 only.
    assert text.count("Epoch: 1/1, Iter: 2/2") == 1, text[-3000:]
    assert (tmp_path / "ckpt" / "model.pt").exists()


def test_embedded_default_inference_then_evaluate(tmp_path):
    """The README's main command on the shipped sample pairs and weights, then evaluate.json."""
    out = tmp_path / "eval"
    ok(bundle("--output_dir", str(out), configs=("inference",)))
    pairs = json.loads((SAMPLE / "HippocampusMR_dataset.json").read_text())["registration_val"]
    assert len(pairs) == 4
    for p in pairs:
        f_id, m_id = Path(p["fixed"]).name[14:18], Path(p["moving"]).name[14:18]
        disp = nib.load(out / f"disp_{f_id}_0000_{m_id}_0000.nii.gz")
        assert disp.shape == (64, 64, 64, 3) and disp.get_data_dtype() == np.float32
        fixed = nib.load(SAMPLE / p["fixed"])
        assert np.allclose(disp.affine, fixed.affine)
        warped = nib.load(out / f"warped_label_{f_id}_{m_id}.nii.gz").get_fdata()
        assert set(np.unique(warped)) <= {0, 1, 2}
        assert (out / f"figure_{f_id}_{m_id}.png").stat().st_size > 10_000
    assert len((out / "timing.csv").read_text().splitlines()) == 5
    assert not list(out.glob(".tmp-*")), "temporary files left behind"

    proc = ok(bundle("--disp_dir", str(out), configs=("evaluate",)))
    assert "| dice |" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_pairs"] == 4 and metrics["labels"] == [1, 2]

    # The unregistered baseline on the same pairs: zero fields, same evaluation.
    zero = tmp_path / "zero"
    ok(
        forkserver.run(
            [sys.executable, "-m", "scripts.evaluation", "--dataset_dir", str(SAMPLE), "--output_dir", str(zero)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    baseline = json.loads((zero / "metrics.json").read_text())
    assert baseline["dice"]["mean"] == pytest.approx(0.5516, abs=1e-4)  # sample pairs, no registration
    assert metrics["dice"]["mean"] > baseline["dice"]["mean"] + 0.1, (metrics["dice"], baseline["dice"])


def _broken_copy(tmp_path: Path) -> Path:
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    return data


@pytest.mark.parametrize("problem", ["missing", "corrupt", "shape", "empty_pairs", "bad_json"])
def test_bad_input_stops_before_any_output(tmp_path, problem):
    data = _broken_copy(tmp_path)
    index = data / "HippocampusMR_dataset.json"
    first_fixed = data / json.loads(index.read_text())["registration_val"][0]["fixed"]
    expected = first_fixed.name
    if problem == "missing":
        first_fixed.unlink()
    elif problem == "corrupt":
        first_fixed.write_bytes(first_fixed.read_bytes()[:2000])
    elif problem == "shape":
        label = data / "labelsTr" / first_fixed.name
        img = nib.load(label)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :60], img.affine), label)
    elif problem == "empty_pairs":
        content = json.loads(index.read_text())
        content["registration_val"] = []
        index.write_text(json.dumps(content))
        expected = index.name
    elif problem == "bad_json":
        index.write_text("{not json")
        expected = index.name
    out = tmp_path / "out"
    from tests.test_bad_inputs import infer_here

    error = infer_here(data, out, ROOT / "models" / "model.pt", [])
    assert error is not None and expected in error, error
    assert not out.exists() or not any(out.iterdir()), "output written despite bad input"


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from scripts.networks import SpatialGradientRegNet

    wrong = tmp_path / "wrong.pt"
    torch.save(SpatialGradientRegNet(channels=(4, 8, 16, 32, 64)).state_dict(), wrong)
    out = tmp_path / "out"
    proc = bundle("--ckpt_path", str(wrong), "--output_dir", str(out), configs=("inference",))
    assert proc.returncode != 0
    assert "size mismatch" in proc.stderr, proc.stderr[-3000:]
    assert not list(out.glob("disp_*")), "a field was written with the wrong weights"


def test_shipped_weights_match_their_hash_in_large_files():
    import hashlib

    import yaml

    entries = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    (entry,) = [e for e in entries if e["path"] == "models/model.pt"]
    digest = hashlib.sha256((ROOT / entry["path"]).read_bytes()).hexdigest()
    assert digest == entry["hash_val"], "models/model.pt changed: update its hash_val in large_files.yml"


def test_shipped_segmentation_network_labels_the_sample_images():
    """models/seg_hippocampus.pt (--io_similarity dice) loads into inference.json's io_segmenter_def and
    labels the 8 sample images (validation subjects: not trained on) about as documented (0.872 / 0.854 on
    the 40 validation subjects, docs/inference.md)."""
    from monai.bundle import ConfigParser

    from scripts.inferers import RegistrationTestTimeInferer

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "io_seg_ckpt": str(ROOT / "models" / "seg_hippocampus.pt")})
    segmenter = parser.get_parsed_content("io_segmenter")
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = RegistrationTestTimeInferer(steps=1, similarity="dice", segmenter=segmenter)
    dice = []
    for image in sorted((ROOT / "sample_data" / "HippocampusMR" / "imagesTr").glob("*.nii.gz")):
        d = preprocessing({"image": str(image), "label": str(image).replace("imagesTr", "labelsTr")})
        probabilities = inferer.foreground(d["image"].as_tensor()[None].float())  # (1, 2, H, W, D)
        background = 1 - probabilities.sum(1, keepdim=True)
        predicted = torch.cat([background, probabilities], 1).argmax(1)[0]
        truth = d["label"].as_tensor()[0]
        dice.append(
            [
                float(2 * ((predicted == v) & (truth == v)).sum() / ((predicted == v).sum() + (truth == v).sum()))
                for v in (1, 2)
            ]
        )
    dice = np.array(dice)
    assert dice.mean() > 0.83 and dice.min() > 0.7, dice
