"""Folding and spread of log-Jacobians of Learn2Reg displacement files, in the centre of the grid
and in the border around it (where a model trained on a smaller canvas never saw voxels).

The Jacobian determinant is computed with numpy central differences (not the official evaluation's
stencil), so the values compare folders with each other, not with evaluate.json. docs/training.md
(run w8m) reports the output of

    python benchmarks/folding_by_region.py runs/val_shipped runs/val_w8m --centre 48 64 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """ddf (X, Y, Z, 3) in voxels -> det(I + grad ddf), (X, Y, Z)."""
    jac = np.empty(ddf.shape[:3] + (3, 3))
    for i in range(3):
        for j, grad in enumerate(np.gradient(ddf[..., i], axis=(0, 1, 2))):
            jac[..., i, j] = grad + (i == j)
    return np.linalg.det(jac)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders of disp_*.nii.gz")
    parser.add_argument("--centre", type=int, nargs=3, default=[48, 64, 48], help="size of the centred region")
    args = parser.parse_args(argv)
    for folder in args.folders:
        files = sorted(folder.glob("disp_*.nii.gz"))
        if not files:
            raise SystemExit(f"{folder}: no disp_*.nii.gz files")
        rows = []
        for f in files:
            ddf = np.asarray(nib.load(f).dataobj, dtype=np.float64)
            det = jacobian_determinant(ddf)
            centre = np.zeros(det.shape, bool)
            centre[
                tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(det.shape, args.centre, strict=True))
            ] = True
            log_det = np.log(np.clip(det, 1e-9, None))
            rows.append(
                [(det[m] <= 0).mean() * 100 for m in (centre, ~centre)] + [log_det[m].std() for m in (centre, ~centre)]
            )
        fc, fb, lc, lb = np.mean(rows, axis=0)
        print(
            f"{folder} ({len(files)} files): folding % centre {fc:.3f}, border {fb:.3f}; "
            f"std log det centre {lc:.3f}, border {lb:.3f}"
        )


if __name__ == "__main__":
    main()
