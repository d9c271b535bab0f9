"""From spatial gradients to displacement fields, and warping with them.

Conventions (MONAI's ``Warp``): a displacement field (DDF) has shape (B, 3, H, W, D), in voxels,
channel i being the displacement along tensor axis i + 2, and pulls the moving image onto the fixed
grid: ``warped(x) = moving(x + ddf(x))``. Grids use the align_corners=True convention (voxel centres
at integer coordinates), which is also what ``scipy.ndimage.map_coordinates`` and the Learn2Reg
evaluation use.
"""

from __future__ import annotations

import warnings

import torch
from monai.networks.blocks import Warp

__all__ = ["gradient_to_ddf", "warp_image", "warp_labels_onehot", "warp_labels_nearest"]


def _warp(image: torch.Tensor, ddf: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    # A fresh Warp per call: its cached reference grid would otherwise be shared across devices.
    with warnings.catch_warnings():
        # MONAI warns when it falls back to torch's grid_sample (no C++ extension): that is intended.
        warnings.simplefilter("ignore")
        warp = Warp(mode=mode, padding_mode=padding)
    return warp(image, ddf)


def gradient_to_ddf(grad: torch.Tensor) -> torch.Tensor:
    """Integrate a spatial gradient into a displacement field by cumulative summation.

    Channel c of ``grad`` is the derivative of the sampling coordinate p_c along spatial axis c,
    and p_c(i) = sum_{k <= i} g_c(k) - 1, so p_c(i) = i when g == 1. The displacement is
    p_c(i) - i = sum_{k <= i} (g_c(k) - 1): summing ``g - 1`` keeps the identity exactly zero.

    Args:
        grad: (..., 3, H, W, D), positive values; 1 is the identity.

    Returns:
        ddf (..., 3, H, W, D) in voxels, channel c along the c-th spatial axis. Because g > 0,
        x_c + ddf_c is strictly increasing along axis c (no self-crossing along an axis).
    """
    if grad.ndim < 4 or grad.shape[-4] != 3:
        raise ValueError(f"grad must be (..., 3, H, W, D), got shape {list(grad.shape)}")
    g = grad - 1
    return torch.stack([torch.cumsum(g[..., c, :, :, :], dim=g.ndim - 4 + c) for c in range(3)], dim=-4)


def warp_image(image: torch.Tensor, ddf: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Trilinear warp. image (B, C, H, W, D), ddf (B, 3, H, W, D) in voxels -> (B, C, H, W, D).

    ``padding`` is "border" (repeat edge values, for intensities) or "zeros".
    """
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be 'border' or 'zeros', got {padding!r}")
    return _warp(image, ddf, "bilinear", padding)


def warp_labels_onehot(onehot: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Trilinear warp of one-hot labels (B, L, H, W, D) -> soft labels, differentiable (training).

    Outside the moving image everything is background: zero padding for the foreground channels,
    and channel 0 (background) is padded with ones by warping its complement.
    """
    warped = _warp(onehot, ddf, "bilinear", "zeros")
    background = 1 - _warp(1 - onehot[:, :1], ddf, "bilinear", "zeros")
    return torch.cat([background, warped[:, 1:]], dim=1)


def warp_labels_nearest(labels: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map (B, 1, H, W, D); 0 outside the image.

    Values are copied, never interpolated: the output holds only labels present in the input.
    """
    return _warp(labels.float(), ddf, "nearest", "zeros").to(labels.dtype)
