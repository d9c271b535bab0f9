"""MONAI's experiment tracking (``python -m monai.bundle run ... --tracking mlflow``, monai.bundle's default
MLflow settings) on the bundle's configs, as a MONAI user runs it: training logs its loss and validation
metrics with the executed config to one MLflow database, ``<bundle_root>/runs/mlruns.db``, and no command
writes MLflow's files or its copy of the config into a folder of results (which are written whole and
listed in their manifest)."""

import json
import math
import os
import subprocess

import pytest
from conftest import HIPPO

from tests.test_bundle import ROOT, SAMPLE, bundle, load, ok, tiny_training

# MLflow lives in an environment of its own (tests/setup_tracking_venv.sh): installed in the test environment,
# every `import monai` of the suite would import it too.
PYTHON = ROOT / ".venv-tracking" / "bin" / "python"
CONFIGS = ("train", "inference", "evaluate", "seg_train", "seg_inference", "io_seg_train")
needs_mlflow = pytest.mark.skipif(
    not PYTHON.exists() and os.environ.get("CI") != "true",  # in CI it must exist: the tests fail without it
    reason=f"needs {PYTHON.parent.parent} (bash tests/setup_tracking_venv.sh)",
)
READ_RUNS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri="sqlite:///" + sys.argv[1])
found = {}
for experiment in client.search_experiments():
    for run in client.search_runs([experiment.experiment_id]):
        history = {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
                   for k in run.data.metrics}
        found[run.info.run_name] = {"status": run.info.status, "metrics": history,
                                    "artifacts": [a.path for a in client.list_artifacts(run.info.run_id)]}
print(json.dumps(found))
"""


def tracked_runs(db) -> dict:
    """{run name: {"status", "metrics": {name: [values by step]}, "artifacts": [paths]}} of every run in the
    MLflow database ``db``, read with MLflow's client."""
    proc = subprocess.run([PYTHON, "-c", READ_RUNS, str(db)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_config_keeps_tracking_out_of_its_results():
    """The configs that write a folder of results keep MONAI's copy of the executed config out of it; those that
    log to MLflow name one database; the trainers hand MONAI's MLflow handler a decollated output (its default
    ``from_engine(['loss'], first=True)`` reads the loss of the first item)."""
    uris = {name: load(name).get("tracking_uri") for name in CONFIGS}
    assert len({u for n, u in uris.items() if n != "evaluate"}) == 1, uris
    for name in ("inference", "evaluate", "seg_inference"):
        assert load(name)["save_execute_config"] is False, name
    for name in ("train", "seg_train", "io_seg_train"):
        config = load(name)
        assert config["output_dir"] == "$@ckpt_dir", name  # an expression: MONAI appends the file name to it
        assert config["train"]["trainer"]["decollate"] is True, name


@pytest.mark.slow
@needs_mlflow
@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"needs {HIPPO} (BUNDLE_TEST_DATA)")
def test_training_logs_loss_and_validation_to_mlflow(tmp_path):
    assert PYTHON.exists(), f"{PYTHON} is missing: bash tests/setup_tracking_venv.sh"
    ok(bundle(*tiny_training(tmp_path), "--max_epochs", "2", "--tracking", "mlflow", python=PYTHON))
    run, *others = tracked_runs(tmp_path / "runs" / "mlruns.db").values()
    assert not others and run["status"] == "FINISHED"
    history, artifacts = run["metrics"], run["artifacts"]
    assert len(history["train_loss"]) == 4, history  # 4 cases, batches of 2, 2 epochs
    assert all(math.isfinite(v) and v > 0 for v in history["train_loss"])
    assert len(history["val_mean_dice"]) == 2 and all(0 < v < 1 for v in history["val_mean_dice"]), history
    assert len(history["val_hd95"]) == 2
    # the executed config: next to the run's checkpoints, and logged with the run
    saved = list((tmp_path / "runs" / "train").glob("config_*.json"))
    assert len(saved) == 1 and [p for p in artifacts if p.startswith("config_")] == [saved[0].name]
    assert json.loads(saved[0].read_text())["max_epochs"] == 2
    assert (tmp_path / "runs" / "train" / "model.pt").is_file()
    assert not (tmp_path / "eval").exists(), "the inference results folder is left alone"


@pytest.mark.slow
@needs_mlflow
def test_inference_and_evaluation_keep_their_results_folder_clean(tmp_path):
    """With tracking on, the results folder holds what the docs list and nothing else, and its manifest still
    accounts for every file; the inference run is recorded in the bundle's database, and the evaluation's
    metrics with it."""
    assert PYTHON.exists(), f"{PYTHON} is missing: bash tests/setup_tracking_venv.sh"
    out = tmp_path / "results"
    common = ["--bundle_root", str(tmp_path), "--dataset_dir", str(SAMPLE), "--tracking", "mlflow"]
    ok(bundle(*common, "--ckpt_path", str(ROOT / "models" / "model.pt"), "--output_dir", str(out),
              "--figures", "False", configs=("inference",), python=PYTHON))  # fmt: skip
    written = {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert written == {"manifest.json", *manifest["files"]}, written
    ok(bundle(*common, "--disp_dir", str(out), "--run_name", "evaluation", configs=("evaluate",), python=PYTHON))
    added = {p.name for p in out.iterdir()} - written
    assert added == {"metrics.json", "metrics_per_pair.csv"}, added
    runs = tracked_runs(tmp_path / "runs" / "mlruns.db")
    assert [r["status"] for r in runs.values()] == ["FINISHED", "FINISHED"], runs
    # the evaluation's official metrics, logged as metrics.json has them
    summary, logged = json.loads((out / "metrics.json").read_text()), runs["evaluation"]["metrics"]
    assert logged["dice"] == [pytest.approx(summary["dice"]["mean"])], logged
    assert logged["dice30"] == [pytest.approx(summary["dice"]["p30"])]
    for name in ("hd95", "sdlogj", "folding_percent", "dice_1", "dice_2"):
        assert logged[name] == [pytest.approx(summary[name]["mean"])], name
    assert logged["num_pairs"] == [4.0] and logged["num_invalid"] == [0.0]
