"""Learn2Reg evaluation metrics, written to match the official evaluation.

Reference: github.com/MDL-UzL/L2R, ``evaluation/evaluation.py`` and ``evaluation/utils.py``
(``jacobian_determinant``, ``compute_dice``, ``compute_hd95``, the warp by ``map_coordinates``
and the aggregation by mean / std / ``np.quantile(x, .3)``).

Conventions (docs/method.md): label maps are (H, W, D) arrays on the fixed grid; a
displacement field ``disp`` is (H, W, D, 3) in VOXELS, channel c = displacement along array axis c,
pull convention ``warped(x) = moving(x + disp(x))``.

numpy / scipy / surface_distance only, so it runs anywhere the official script runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import surface_distance

__all__ = [
    "dice_per_label",
    "hd95_per_label",
    "jacobian_determinant",
    "sdlogj_official",
    "sdlogj_plain",
    "folding_percent",
    "warp_labels_official",
    "summarize",
    "evaluate_pair",
]


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _check_label_map(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D label map (H, W, D), got shape {arr.shape}")
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} has shape {b.shape}, expected {a.shape} (the shape of {name_a})")


def _check_disp(disp: np.ndarray, spatial_shape: tuple[int, ...] | None = None) -> np.ndarray:
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        expected = "(H, W, D, 3)" if spatial_shape is None else str(tuple(spatial_shape) + (3,))
        raise ValueError(f"disp must have shape {expected} (voxels, channel last), got {disp.shape}")
    if spatial_shape is not None and disp.shape[:3] != tuple(spatial_shape):
        raise ValueError(
            f"disp has shape {disp.shape}, expected {tuple(spatial_shape) + (3,)} "
            "(fixed.shape + (3,): full resolution of the fixed image)"
        )
    return disp


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """np.nanmean without the all-NaN RuntimeWarning (returns NaN then)."""
    values = np.asarray(values, dtype=float)
    keep = ~np.isnan(values)
    return float(values[keep].mean()) if keep.any() else float("nan")


def _present(fixed_seg: np.ndarray, moving_seg: np.ndarray, label: float) -> bool:
    # Official rule: a label is scored only if it is in the fixed AND in the (unwarped) moving map.
    return bool((fixed_seg == label).any() and (moving_seg == label).any())


# ---------------------------------------------------------------------------------------------
# overlap and surface distance
# ---------------------------------------------------------------------------------------------
def dice_per_label(
    fixed_seg: np.ndarray, warped_seg: np.ndarray, moving_seg: np.ndarray, labels: Sequence[float]
) -> np.ndarray:
    """Dice between ``fixed_seg == l`` and ``warped_seg == l`` for every label ``l``.

    Args:
        fixed_seg: (H, W, D) label map of the fixed image.
        warped_seg: (H, W, D) moving label map warped onto the fixed grid.
        moving_seg: unwarped moving label map (any 3-D shape); only used to decide which labels
            are scored.
        labels: label values to score.

    Returns:
        (len(labels),) float array, unitless in [0, 1]; NaN where the label is absent from the
        fixed or from the unwarped moving map (official rule). A label present in both but warped
        away entirely scores 0, not NaN.
    """
    fixed_seg = _check_label_map(fixed_seg, "fixed_seg")
    warped_seg = _check_label_map(warped_seg, "warped_seg")
    moving_seg = _check_label_map(moving_seg, "moving_seg")
    _check_same_shape(fixed_seg, warped_seg, "fixed_seg", "warped_seg")
    out = np.full(len(labels), np.nan)
    for i, label in enumerate(labels):
        if not _present(fixed_seg, moving_seg, label):
            continue
        a, b = fixed_seg == label, warped_seg == label
        # same as surface_distance.compute_dice_coefficient; the sum is > 0 because a is non-empty
        out[i] = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    return out


def hd95_per_label(
    fixed_seg: np.ndarray,
    warped_seg: np.ndarray,
    moving_seg: np.ndarray,
    labels: Sequence[float],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """95th-percentile symmetric surface distance per label (DeepMind ``surface_distance``).

    Args:
        fixed_seg, warped_seg, moving_seg, labels: as in :func:`dice_per_label`.
        spacing: voxel size along the 3 array axes. The official value forces (1, 1, 1), so it is
            in VOXELS; pass the real spacing (mm) to get millimetres.

    Returns:
        (len(labels),) float array in the units of ``spacing``; NaN under the same rule as Dice.
        ``inf`` where the label was warped away entirely: that is what the official code returns
        with numpy 1.x (``surface_distance`` 0.1 uses ``np.Inf``, which numpy 2 removed, so we
        return it ourselves instead of crashing).
    """
    fixed_seg = _check_label_map(fixed_seg, "fixed_seg")
    warped_seg = _check_label_map(warped_seg, "warped_seg")
    moving_seg = _check_label_map(moving_seg, "moving_seg")
    _check_same_shape(fixed_seg, warped_seg, "fixed_seg", "warped_seg")
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (3,):
        raise ValueError(f"spacing must have 3 values (one per array axis), got {spacing.tolist()}")
    out = np.full(len(labels), np.nan)
    for i, label in enumerate(labels):
        if not _present(fixed_seg, moving_seg, label):
            continue
        a, b = fixed_seg == label, warped_seg == label
        if not b.any():
            out[i] = np.inf
            continue
        with warnings.catch_warnings():  # surface_distance 0.1 uses deprecated scipy namespaces
            warnings.simplefilter("ignore", DeprecationWarning)
            dists = surface_distance.compute_surface_distances(a, b, spacing)
        out[i] = surface_distance.compute_robust_hausdorff(dists, 95.0)
    return out


# ---------------------------------------------------------------------------------------------
# Jacobian determinant and the regularity scores
# ---------------------------------------------------------------------------------------------
def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of ``x + disp(x)``, as the official evaluation computes it.

    Derivatives are central differences (kernel [-0.5, 0, 0.5], scipy ``correlate`` with zero
    padding, i.e. ``mode='constant'``), then 2 voxels are cropped at every border (the zero padding
    corrupts only the outermost voxel).

    Args:
        disp: (H, W, D, 3) displacement in voxels, channel c along array axis c; each of H, W, D
            must be >= 5.

    Returns:
        (H - 4, W - 4, D - 4) float64 array, unitless (local volume ratio).
    """
    disp = _check_disp(disp)
    if min(disp.shape[:3]) < 5:
        raise ValueError(f"disp spatial shape {disp.shape[:3]} too small: the 2-voxel crop needs >= 5")
    # float64 as the official script gets from nibabel get_fdata(); correlate keeps the input dtype.
    disp = disp.astype(np.float64, copy=False)
    crop = (slice(2, -2),) * 3
    kernel = np.array([-0.5, 0.0, 0.5])
    # j[a][c] = d(x + u)_c / dx_a, indexed like the official array (the transpose of the usual
    # Jacobian, which has the same determinant); cropped right away to keep memory down.
    j = [[None] * 3 for _ in range(3)]
    for a in range(3):  # axis of the derivative
        for c in range(3):  # component of the displacement
            d = scipy.ndimage.correlate1d(disp[..., c], kernel, axis=a, mode="constant", cval=0.0)
            j[a][c] = d[crop] + (1.0 if a == c else 0.0)
    # cofactor expansion along the first column, in the official order of operations
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[1][0] * (j[0][1] * j[2][2] - j[0][2] * j[2][1])
        + j[2][0] * (j[0][1] * j[1][2] - j[0][2] * j[1][1])
    )


def sdlogj_official(jacdet: np.ndarray) -> float:
    """Official SDlogJ: ``std(log(clip(J + 3, 1e-9, 1e9)))`` over all voxels of ``jacdet``.

    The ``+ 3`` is the official quirk (it keeps folds finite but shrinks the score; a zero field
    gives 0). Input: the array from :func:`jacobian_determinant`. Unitless; population std.
    """
    return float(np.log(np.clip(np.asarray(jacdet, dtype=float) + 3.0, 1e-9, 1e9)).std())


def sdlogj_plain(jacdet: np.ndarray) -> float:
    """Textbook SDlogJ: ``std(log J)`` over voxels with ``J > 0`` (NaN if there are none)."""
    jacdet = np.asarray(jacdet, dtype=float)
    positive = jacdet[jacdet > 0]
    return float(np.log(positive).std()) if positive.size else float("nan")


def folding_percent(jacdet: np.ndarray) -> float:
    """Percentage (0-100) of voxels with ``J <= 0``, i.e. where the transform folds.

    The official script's ``num_foldings`` counts ``J + 3 <= 0`` after clipping to >= 1e-9, which
    is never true, so it is always 0; this is the count it meant.
    """
    jacdet = np.asarray(jacdet, dtype=float)
    return float(100.0 * np.count_nonzero(jacdet <= 0) / jacdet.size)


# ---------------------------------------------------------------------------------------------
# warping and aggregation
# ---------------------------------------------------------------------------------------------
def warp_labels_official(moving_seg: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Warp a label map like the official script: ``map_coordinates(moving, id + disp, order=0)``.

    Args:
        moving_seg: 3-D moving label map (need not have the fixed shape: it is sampled).
        disp: (H, W, D, 3) displacement in voxels on the fixed grid.

    Returns:
        (H, W, D) label map, same dtype as ``moving_seg``; nearest neighbour, and 0 (background)
        wherever ``x + disp(x)`` falls outside the moving image (scipy's default constant mode).
    """
    moving_seg = _check_label_map(moving_seg, "moving_seg")
    disp = _check_disp(disp)
    identity = np.stack(np.meshgrid(*(np.arange(n) for n in disp.shape[:3]), indexing="ij"))
    coords = identity + np.moveaxis(disp, -1, 0)
    return scipy.ndimage.map_coordinates(moving_seg, coords, order=0)


def summarize(values: Sequence[float] | np.ndarray) -> dict:
    """Aggregate per-pair values as the official leaderboard does, ignoring NaNs.

    Returns ``{"mean", "std", "p30", "n"}``: mean, population std (ddof=0, as the official
    ``np.std``), ``p30 = np.quantile(values, 0.3)`` (Dice30 is the 30th PERCENTILE, linear
    interpolation, not the mean of the lowest 30 %), and ``n`` the number of non-NaN values.
    All NaN when there is no value.
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "p30": float("nan"), "n": 0}
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p30": float(np.quantile(values, 0.3)),
        "n": int(values.size),
    }


def evaluate_pair(
    fixed_seg: np.ndarray,
    moving_seg: np.ndarray,
    disp: np.ndarray,
    labels: Sequence[float],
    spacing: Sequence[float] | None = None,
) -> dict:
    """All Learn2Reg scores of one registered pair.

    Args:
        fixed_seg: (H, W, D) fixed label map.
        moving_seg: 3-D moving label map (same grid as the fixed one for Learn2Reg data).
        disp: (H, W, D, 3) displacement in voxels, ``fixed.shape + (3,)``.
        labels: label values to score.
        spacing: optional voxel size (mm) along the array axes, to add ``hd95_mm``.

    Returns:
        dict of floats: ``dice`` (mean over scored labels), ``hd95`` (voxels, official),
        ``hd95_mm`` (only if ``spacing``), ``sdlogj`` (official, "+3"), ``sdlogj_plain``,
        ``folding_percent`` (0-100); and lists ``labels``, ``dice_per_label``,
        ``hd95_per_label`` (+ ``hd95_mm_per_label``), NaN for labels not scored.
    """
    fixed_seg = _check_label_map(fixed_seg, "fixed_seg")
    moving_seg = _check_label_map(moving_seg, "moving_seg")
    disp = _check_disp(disp, fixed_seg.shape)
    labels = list(labels)

    warped = warp_labels_official(moving_seg, disp)
    dice = dice_per_label(fixed_seg, warped, moving_seg, labels)
    hd95 = hd95_per_label(fixed_seg, warped, moving_seg, labels)
    jacdet = jacobian_determinant(disp)

    result = {
        "dice": _nanmean(dice),
        "hd95": _nanmean(hd95),
        "sdlogj": sdlogj_official(jacdet),
        "sdlogj_plain": sdlogj_plain(jacdet),
        "folding_percent": folding_percent(jacdet),
        "labels": labels,
        "dice_per_label": dice.tolist(),
        "hd95_per_label": hd95.tolist(),
    }
    if spacing is not None:
        hd95_mm = hd95_per_label(fixed_seg, warped, moving_seg, labels, spacing)
        result["hd95_mm"] = _nanmean(hd95_mm)
        result["hd95_mm_per_label"] = hd95_mm.tolist()
    return result
