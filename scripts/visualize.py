"""Figures of a registered pair, in the spirit of Fig. 2 of the paper."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["SavePairFigured", "pair_figure"]


def _grid_lines(ax, ddf2d: np.ndarray, step: int) -> None:
    """Deformed grid: where the regular grid of the fixed image samples the moving image."""
    h, w = ddf2d.shape[1:]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = yy + ddf2d[0], xx + ddf2d[1]
    for i in range(0, h, step):
        ax.plot(px[i, :], py[i, :], color="tab:orange", lw=0.6)
    for j in range(0, w, step):
        ax.plot(px[:, j], py[:, j], color="tab:orange", lw=0.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def pair_figure(moving, fixed, warped, ddf, fixed_label=None, warped_label=None, axis: int = 2, title: str = ""):
    """A row of the middle slice along ``axis``: moving, fixed, warped moving, deformation grid, and
    label contours (fixed solid, warped moving dashed) over the fixed image.

    Args:
        moving, fixed, warped: (H, W, D) intensities (first channel for multi-channel images).
        ddf: (3, H, W, D) moving->fixed displacement in voxels.
        fixed_label, warped_label: optional (H, W, D) integer label maps.
        axis: the slicing axis (0, 1 or 2).

    Returns:
        a matplotlib Figure (the caller saves or renders it, then closes it).
    """
    k = moving.shape[axis] // 2
    sl = lambda a: np.take(np.asarray(a), k, axis=axis)  # noqa: E731
    in_plane = [c for c in range(3) if c != axis]
    panels = [("moving", moving), ("fixed", fixed), ("warped moving", warped)]
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    for ax, (name, img) in zip(axes, panels, strict=False):
        ax.imshow(sl(img), cmap="gray", origin="upper")
        ax.set_title(name)
    axes[3].imshow(sl(fixed), cmap="gray", origin="upper", alpha=0.4)
    _grid_lines(axes[3], np.stack([sl(ddf[c]) for c in in_plane]), step=max(2, moving.shape[in_plane[0]] // 16))
    axes[3].set_title("deformation grid")
    axes[4].imshow(sl(fixed), cmap="gray", origin="upper")
    if fixed_label is not None and warped_label is not None:
        labels = [v for v in np.unique(fixed_label) if v != 0]
        colors = plt.cm.tab10(np.arange(len(labels)) % 10)
        for v, c in zip(labels, colors, strict=True):
            if (sl(fixed_label) == v).any():
                axes[4].contour(sl(fixed_label) == v, levels=[0.5], colors=[c], linewidths=1.0)
            if (sl(warped_label) == v).any():
                axes[4].contour(sl(warped_label) == v, levels=[0.5], colors=[c], linewidths=1.0, linestyles="--")
    axes[4].set_title("labels: fixed —, warped --")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if title else 1))
    return fig


class SavePairFigured:
    """Postprocessing step of configs/inference.json: saves ``figure_<fixed>_<moving>.png`` (see
    ``pair_figure``) of one decollated pair into ``output_dir`` and returns the data unchanged.

    Reads ``moving_image``, ``fixed_image``, ``warped_image`` (C, H, W, D), ``ddf`` (3, H, W, D) and,
    when present, the one-hot fixed ``label`` and the integer ``warped_label``; all on the common
    (padded) grid the network saw, so it runs before ``scripts.transforms.ToImageGridd``.
    ``enabled=False`` makes it a no-op (``--figures False``)."""

    def __init__(self, output_dir: str, enabled: bool = True, dpi: int = 80) -> None:
        self.output_dir, self.enabled, self.dpi = output_dir, bool(enabled), int(dpi)

    def __call__(self, data: dict) -> dict:
        if not self.enabled:
            return data
        arr = lambda k: torch.as_tensor(data[k]).detach().cpu().numpy()  # noqa: E731
        labels = {}
        if "label" in data and "warped_label" in data:
            labels = {"fixed_label": arr("label").argmax(0), "warped_label": arr("warped_label")[0]}
        f_id, m_id = data["fixed_id"], data["moving_id"]
        fig = pair_figure(
            arr("moving_image")[0],
            arr("fixed_image")[0],
            arr("warped_image")[0],
            arr("ddf"),
            title=f"fixed {f_id}, moving {m_id}",
            **labels,
        )
        os.makedirs(self.output_dir, exist_ok=True)
        fig.savefig(os.path.join(self.output_dir, f"figure_{f_id}_{m_id}.png"), dpi=self.dpi)
        plt.close(fig)
        return data
