"""Ignite handlers specific to pair registration."""

from __future__ import annotations

import csv
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.figure import Figure

from scripts.files import atomic_path, check_output_dir, save_nifti
from scripts.learn2reg import disp_name
from scripts.visualize import pair_figure

__all__ = ["TensorBoardPairImages", "RegistrationWriter", "figure_to_rgb"]


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


class RegistrationWriter:
    """Writes the results of each registered pair into ``output_dir`` (attach to an evaluator that
    uses ``scripts.workflow.RegistrationEvalStep``, after MONAI decollated the batch):

    - ``disp_<fixed>_0000_<moving>_0000.nii.gz`` (``disp_<fixed>_<moving>.nii.gz`` with
      ``disp_name_style="short"``): the Learn2Reg displacement file, H x W x D x 3
      float32 in voxels along the raw array axes, on the fixed grid, with the fixed image's affine;
      with ``inverse``, also the file of the reversed pair (fixed->moving field, moving grid);
    - ``warped_image_<fixed>_<moving>.nii.gz`` and, when the moving image has labels,
      ``warped_label_<fixed>_<moving>.nii.gz`` (nearest neighbour, uint8), on the fixed grid;
    - ``figure_<fixed>_<moving>.png``: moving, fixed, warped, deformation grid, label contours;
    - ``timing.csv``: fixed_id, moving_id, seconds (network + integration) for every pair.

    Every file is written under a temporary name and renamed when complete. An ``output_dir`` that
    cannot be created or written is refused when the writer is created (``check_output_dir``).
    """

    def __init__(self, output_dir: str, figures: bool = True, disp_name_style: str = "long") -> None:
        disp_name("0", "0", disp_name_style)  # refuse a bad style before anything runs
        check_output_dir(output_dir)
        self.output_dir, self.figures, self.disp_name_style = output_dir, figures, disp_name_style
        self._timings: list[tuple[str, str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_timings)

    def _start(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self._timings = []

    def __call__(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self._write_pair(item, _numpy(out))

    def _write_pair(self, item: dict, out: dict) -> None:
        f_id, m_id = str(item["fixed_id"]), str(item["moving_id"])
        affine = np.asarray(item["fixed_image"].affine)
        path = lambda name: os.path.join(self.output_dir, name)  # noqa: E731
        save_nifti(out["ddf"].transpose(1, 2, 3, 0).astype(np.float32), affine, path(disp_name(f_id, m_id, self.disp_name_style)))
        if "ddf_inverse" in out:
            inv = out["ddf_inverse"].transpose(1, 2, 3, 0).astype(np.float32)
            save_nifti(inv, np.asarray(item["moving_image"].affine), path(disp_name(m_id, f_id, self.disp_name_style)))
        save_nifti(out["warped_image"][0].astype(np.float32), affine, path(f"warped_image_{f_id}_{m_id}.nii.gz"))
        labels = {}
        if "pred" in out:
            warped_label = out["pred"].argmax(0).astype(np.uint8)
            save_nifti(warped_label, affine, path(f"warped_label_{f_id}_{m_id}.nii.gz"))
            labels = {"fixed_label": out["label"].argmax(0), "warped_label": warped_label}
        if self.figures:
            fig = pair_figure(
                out["moving_image"][0], out["fixed_image"][0], out["warped_image"][0], out["ddf"],
                title=f"fixed {f_id}, moving {m_id}", **labels,
            )
            with atomic_path(path(f"figure_{f_id}_{m_id}.png")) as tmp:
                fig.savefig(tmp, dpi=80)
            plt.close(fig)
        self._timings.append((f_id, m_id, float(out["seconds"])))

    def _write_timings(self, engine: Engine) -> None:
        with atomic_path(os.path.join(self.output_dir, "timing.csv")) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["fixed_id", "moving_id", "seconds"])
                writer.writerows((f, m, f"{s:.4f}") for f, m, s in self._timings)
