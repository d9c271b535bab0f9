"""From spatial gradients to displacement fields, and warping with them.

Conventions (MONAI's ``Warp``): a displacement field (DDF) has shape (B, 3, H, W, D), in voxels,
channel i being the displacement along tensor axis i + 2, and pulls the moving image onto the fixed
grid: ``warped(x) = moving(x + ddf(x))``. Grids use the align_corners=True convention (voxel centres
at integer coordinates), which is also what ``scipy.ndimage.map_coordinates`` and the Learn2Reg
evaluation use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.layers import gaussian_1d, separable_filtering

__all__ = [
    "compose_ddf",
    "ddf_to_gradient",
    "flip_ddf",
    "gradient_to_ddf",
    "invert_ddf",
    "smooth_ddf",
    "warp_image",
    "warp_labels_onehot",
    "warp_labels_nearest",
]


_REFERENCE_GRIDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _reference_grid(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel coordinates (1, H, W, D, 3) and the normalising denominators (3,), built on ``device``.
    Kept for grids of at most 2^22 voxels (48 MiB in float32; a few entries: the training crop, the
    validation and inference grids); a larger one (a whole CT) is built for each call instead of
    staying in memory."""
    key = (tuple(shape), device, dtype)
    if key in _REFERENCE_GRIDS:
        return _REFERENCE_GRIDS[key]
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]
    denominators = torch.tensor([max(n - 1, 1) for n in shape], device=device, dtype=dtype)
    if math.prod(shape) <= 2**22:
        if len(_REFERENCE_GRIDS) >= 8:
            _REFERENCE_GRIDS.clear()
        _REFERENCE_GRIDS[key] = (grid, denominators)
    return grid, denominators


def _warp(image: torch.Tensor, ddf: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """MONAI ``Warp`` (torch ``grid_sample`` path, ``align_corners=True``), same arithmetic in the same
    order, so the same values to the bit. Why not ``Warp`` itself: an instance caches one reference
    grid whatever the device, and a new instance builds it on the CPU, stacked for the batch, then
    copies it over: on an H100 that copy and the backward of ``Warp``'s channel reindexing took most of
    a training step (0.19 s of which the network's forward was 0.012 s, 14 warps a step with deep
    supervision). Here the grid lives on the device, one per shape, and channels are reversed with
    ``flip`` (whose backward is a flip)."""
    if (
        ddf.ndim != 5
        or image.ndim != 5
        or ddf.shape[1] != 3
        or ddf.shape[0] != image.shape[0]
        or ddf.shape[2:] != image.shape[2:]
    ):
        raise ValueError(
            f"image (B, C, H, W, D) and ddf (B, 3, H, W, D) must match, got {list(image.shape)} and {list(ddf.shape)}"
        )
    reference, denominators = _reference_grid(tuple(ddf.shape[2:]), ddf.device, ddf.dtype)
    grid = (reference + ddf.permute(0, 2, 3, 4, 1)) * 2 / denominators - 1
    return F.grid_sample(image, grid.flip(-1), mode=mode, padding_mode=padding, align_corners=True)


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


def ddf_to_gradient(ddf: torch.Tensor) -> torch.Tensor:
    """The inverse of ``gradient_to_ddf``: the spatial gradient g whose cumulative sum is ``ddf``.

    g_c(0) = ddf_c(0) + 1 and g_c(i) = ddf_c(i) - ddf_c(i - 1) + 1 along spatial axis c: the forward
    differences of the sampling coordinates. A field with g > 0 everywhere is strictly increasing
    along each axis (no self-crossing along an axis); the mean of such fields is too, since the mean
    of their g is positive.

    Args:
        ddf: (..., 3, H, W, D) in voxels, channel c along the c-th spatial axis.

    Returns:
        g (..., 3, H, W, D); ``gradient_to_ddf(ddf_to_gradient(ddf))`` equals ``ddf`` to rounding.
    """
    if ddf.ndim < 4 or ddf.shape[-4] != 3:
        raise ValueError(f"ddf must be (..., 3, H, W, D), got shape {list(ddf.shape)}")
    grads = []
    for c in range(3):
        d = ddf[..., c, :, :, :]
        dim = ddf.ndim - 4 + c
        grads.append(torch.diff(d, dim=dim, prepend=torch.zeros_like(d.narrow(dim, 0, 1))) + 1)
    return torch.stack(grads, dim=-4)


def flip_ddf(ddf: torch.Tensor, axes: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The displacement field of a pair registered in flipped coordinates, on the unflipped grid.

    If ``ddf`` registers the images flipped along spatial ``axes`` (``image.flip([a + 2 for a in
    axes])``), the result registers the images as they are: ``warp(moving, flip_ddf(ddf, axes))``
    equals ``warp(flipped moving, ddf)`` flipped back. The field is flipped along those axes and its
    components along them change sign (x -> n - 1 - x reverses their direction); the others keep
    theirs. Applying it twice gives ``ddf`` back.

    Args:
        ddf: (B, 3, H, W, D) in voxels. axes: spatial axes, each 0, 1 or 2.
    """
    axes = sorted({int(a) for a in axes})
    if ddf.ndim != 5 or ddf.shape[1] != 3 or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"ddf must be (B, 3, H, W, D) and axes among 0, 1, 2, got {list(ddf.shape)} and {axes}")
    if not axes:
        return ddf
    out = ddf.flip([a + 2 for a in axes])
    sign = torch.ones(3, dtype=ddf.dtype, device=ddf.device)
    sign[axes] = -1
    return out * sign.view(1, 3, 1, 1, 1)


def invert_ddf(ddf: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The inverse displacement field, by fixed-point iteration: v(x) = -u(x + v(x)).

    If ``ddf`` = u maps a point y to y + u(y), the result v maps y + u(y) back to y, to the extent the
    iteration converges (it does where u is smooth, |grad u| < 1; the error shrinks by that factor per
    iteration). u is sampled trilinearly with border padding (outside the grid u keeps its edge value).

    Args:
        ddf: (B, 3, H, W, D) in voxels. iterations: fixed-point iterations, starting from v = -u.
    """
    v = -ddf
    for _ in range(int(iterations)):
        v = -warp_image(ddf, v, padding="border")
    return v


def compose_ddf(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The DDF of warping by ``first``, then warping the result by ``then``: w(x) = then(x) + first(x + then(x)).

    With ``warp_image(image, u)(x) = image(x + u(x))``: ``warp_image(warp_image(m, first), then)`` samples m
    at x + w(x). ``first`` is sampled trilinearly with border padding (outside the grid it keeps its edge
    value). The Jacobian of the composed map is the product of the two maps' Jacobians (at x + then(x)
    and x), so it is positive wherever both are.

    Args:
        first, then: (B, 3, H, W, D) in voxels.
    """
    if first.shape != then.shape or first.ndim != 5 or first.shape[1] != 3:
        raise ValueError(
            f"both fields must be (B, 3, H, W, D) of one shape, got {list(first.shape)} and {list(then.shape)}"
        )
    return then + warp_image(first, then, padding="border")


def smooth_ddf(ddf: torch.Tensor, sigma: float) -> torch.Tensor:
    """``ddf`` smoothed by a Gaussian of ``sigma`` voxels along each spatial axis: MONAI's sampled,
    normalised ``gaussian_1d`` truncated at 4 sigma, applied by ``separable_filtering`` with the borders
    replicated (the same as ``scipy.ndimage.gaussian_filter(mode="nearest")`` per channel).

    A translation (a constant field) is unchanged to rounding, the identity exactly. The forward differences of the
    result are those of ``ddf`` averaged by a normalised non-negative kernel, the replicated border
    contributing differences of 0 (g == 1): so g of the result is positive wherever g of ``ddf`` is, at
    every index but 0 along each axis (index 0 is the border sample ``ddf + 1``, not a difference), and
    a field without self-crossing along an axis keeps that property. ``sigma`` 0 returns ``ddf`` itself.

    Args:
        ddf: (B, 3, H, W, D) in voxels. sigma: standard deviation in voxels, not negative.
    """
    sigma = float(sigma)
    if not sigma >= 0:  # also catches nan
        raise ValueError(f"sigma must not be negative, got {sigma}")
    if sigma == 0:
        return ddf
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(f"ddf must be (B, 3, H, W, D), got shape {list(ddf.shape)}")
    kernel = gaussian_1d(torch.tensor(sigma, dtype=torch.float64), truncated=4.0, approx="sampled", normalize=True)
    return separable_filtering(ddf, [kernel.to(device=ddf.device, dtype=ddf.dtype)] * 3, mode="replicate")


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
