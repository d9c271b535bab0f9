"""Ignite handlers specific to pair registration."""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil

import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.figure import Figure

from scripts.files import atomic_path, publish_dir, sha256_of
from scripts.visualize import pair_figure

__all__ = ["MANIFEST", "RegistrationResults", "TensorBoardPairImages", "figure_to_rgb", "write_manifest"]

MANIFEST = "manifest.json"


def _numpy(item: dict) -> dict:
    """A decollated engine output as numpy arrays (MONAI turns 0-d tensors into Python numbers)."""
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in item.items()}


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Renders a matplotlib figure to an (H, W, 3) uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class TensorBoardPairImages:
    """After each evaluation, writes the figure of the first pair of the last batch to TensorBoard
    (moving, fixed, warped, grid, label contours), at the evaluator's epoch (MONAI's
    ``ValidationHandler`` runs the evaluator at the trainer's epoch).

    Attach to an evaluator whose iteration returns ``moving_image``, ``fixed_image``,
    ``warped_image``, ``ddf`` and optionally one-hot ``pred`` / ``label`` (see
    ``scripts.workflow.RegistrationEvalStep``).
    """

    def __init__(self, log_dir: str, tag: str = "val_pair") -> None:
        self.log_dir, self.tag = log_dir, tag
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        out = engine.state.output
        item = out[0] if isinstance(out, list) else {k: v[0] for k, v in out.items()}
        arr = _numpy(item)
        labels = {}
        if "pred" in arr and "label" in arr:
            labels = {"fixed_label": arr["label"].argmax(0), "warped_label": arr["pred"].argmax(0)}
        fig = pair_figure(arr["moving_image"][0], arr["fixed_image"][0], arr["warped_image"][0], arr["ddf"], **labels)
        step = engine.state.epoch
        self._writer.add_image(self.tag, figure_to_rgb(fig), step, dataformats="HWC")
        self._writer.flush()
        plt.close(fig)


class RegistrationResults:
    """Completes the output folder of configs/inference.json, which is written as a whole.

    The postprocessing (``SaveImaged``, ``scripts.visualize.SavePairFigured``) writes every pair's
    files into ``staging_dir``, a temporary folder next to ``output_dir``. This handler collects the
    per-pair timings and, once every pair is done, writes there

    - ``timing.csv``: fixed_id, moving_id, seconds (network + integration) for every pair;
    - ``manifest.json``: what produced the folder (bundle version, checkpoint and its sha256, the
      settings given in ``manifest``), the pairs (ids and image paths) and the sha256 of every file;
      ``configs/evaluate.json`` uses it to refuse a folder whose files do not all come from one run;

    then moves the folder to ``output_dir`` (``scripts.files.publish_dir``: a non-empty
    ``output_dir`` is replaced only with ``overwrite``, and only once the new folder is complete). If
    the run fails, the staging folder is removed; one left by a killed run is removed by the next run
    (``scripts.files.staging_path``). So ``output_dir`` holds either nothing new or one complete run.

    List it FIRST among the evaluator's handlers: Ignite calls the ``EXCEPTION_RAISED`` handlers in
    order and MONAI's ``StatsHandler`` re-raises, so a handler after it would never clean up.

    Args:
        staging_dir: where the postprocessing writes (``scripts.files.staging_path(output_dir)``).
        output_dir: the final folder.
        overwrite: replace a non-empty ``output_dir``.
        manifest: settings to record (checkpoint path under ``"checkpoint"``, network settings, ...).
    """

    def __init__(
        self, staging_dir: str, output_dir: str, overwrite: bool = False, manifest: dict | None = None
    ) -> None:
        self.staging_dir, self.output_dir, self.overwrite = staging_dir, output_dir, bool(overwrite)
        self.manifest = dict(manifest or {})
        self._timings: list[tuple[str, str, float]] = []
        self._pairs: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._finish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _start(self, engine: Engine) -> None:
        self._timings, self._pairs = [], []
        os.makedirs(self.staging_dir, exist_ok=True)

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output, strict=True):
            f_id, m_id = str(item["fixed_id"]), str(item["moving_id"])
            self._timings.append((f_id, m_id, float(out["seconds"])))
            files = {k: str(item[k].meta.get("filename_or_obj", "")) for k in ("fixed_image", "moving_image")}
            self._pairs.append({"fixed_id": f_id, "moving_id": m_id, **files})

    def _finish(self, engine: Engine) -> None:
        try:
            with open(os.path.join(self.staging_dir, "timing.csv"), "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["fixed_id", "moving_id", "seconds"])
                writer.writerows((a, b, f"{s:.4f}") for a, b, s in self._timings)
            write_manifest(self.staging_dir, self.manifest, self._pairs)
            publish_dir(self.staging_dir, self.output_dir, self.overwrite)
        except BaseException:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            raise

    def _failed(self, engine: Engine, e: Exception) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        raise e


def _bundle_version() -> str:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "metadata.json")
    try:
        with open(path) as f:
            return str(json.load(f).get("version", "unknown"))
    except (OSError, ValueError):
        return "unknown"


def write_manifest(folder: str, settings: dict, pairs: list[dict]) -> str:
    """Writes ``<folder>/manifest.json`` (see ``RegistrationResults``) and returns its path. Every file
    already in ``folder`` is listed with its sha256; a ``checkpoint`` path in ``settings`` is hashed too."""
    checkpoint = settings.get("checkpoint")
    content = {
        "written_by": f"spatial-gradient registration bundle {_bundle_version()}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": (
            {"path": str(checkpoint), "sha256": sha256_of(checkpoint)}
            if checkpoint and os.path.isfile(checkpoint)
            else None
        ),
        "settings": {k: v for k, v in settings.items() if k != "checkpoint"},
        "pairs": pairs,
        "files": {name: sha256_of(os.path.join(folder, name)) for name in sorted(os.listdir(folder))},
    }
    path = os.path.join(folder, MANIFEST)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=1, default=str)
        f.write("\n")
    return path
