"""Ignite handlers specific to pair registration."""

from __future__ import annotations

import numpy as np
from ignite.engine import Engine, Events
from matplotlib.figure import Figure

from scripts.visualize import pair_figure

__all__ = ["TensorBoardPairImages", "figure_to_rgb"]


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
        arr = {k: v.detach().cpu().numpy() for k, v in item.items()}
        labels = {}
        if "pred" in arr and "label" in arr:
            labels = {"fixed_label": arr["label"].argmax(0), "warped_label": arr["pred"].argmax(0)}
        fig = pair_figure(arr["moving_image"][0], arr["fixed_image"][0], arr["warped_image"][0], arr["ddf"], **labels)
        step = engine.state.epoch
        self._writer.add_image(self.tag, figure_to_rgb(fig), step, dataformats="HWC")
        self._writer.flush()
        import matplotlib.pyplot as plt

        plt.close(fig)
