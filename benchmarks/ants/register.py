"""ANTs SyN on a list of pairs, written as Learn2Reg displacement files (runs in .venv-ants).

Each pair is registered in voxel space, as the Learn2Reg evaluation reads the files: both arrays get
the same header (origin 0, spacing 1, identity direction), so the NIfTI headers of hippocampus crops,
which carry no anatomical alignment, play no part. ``ants.registration(type_of_transform="SyN")``
(affine then SyN, antspyx defaults). The displacement u(x) is recovered by warping the three
coordinate images with the forward transforms (x + u(x) sampled at every fixed voxel; see
``displacement`` for points mapped outside the moving image) and written
as ``disp_<f>_0000_<m>_0000.nii.gz`` (H x W x D x 3 float32, voxels) with the fixed image's affine.
``timing.csv`` holds the seconds of ``ants.registration`` alone per pair.

    .venv-ants/bin/python benchmarks/ants/register.py pairs.json OUT_DIR
"""

import csv
import json
import os
import sys
import time

import ants
import nibabel as nib
import numpy as np


def voxel_image(path: str):
    return ants.from_numpy(np.asarray(nib.load(path).dataobj, dtype=np.float32))


OUTSIDE = -1e9  # what a coordinate image reads beyond its grid


def displacement(fixed, transforms) -> np.ndarray:
    """u(x) at every fixed voxel, (H, W, D, 3), from the coordinates x + u(x) that the transforms read.

    The coordinate images cover the moving grid padded by its largest size on every side (origin
    shifted accordingly), so a fixed voxel that maps outside the moving image still reads its true
    coordinate instead of a fill value, which would put a jump into the field at the image border.
    """
    shape, pad = fixed.shape, max(fixed.shape)
    axes = [np.arange(-pad, n + pad, dtype=np.float32) for n in shape]
    padded = np.meshgrid(*axes, indexing="ij")
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    sampled = [
        ants.apply_transforms(
            fixed, ants.from_numpy(c, origin=[-float(pad)] * 3), transforms, "linear", defaultvalue=OUTSIDE
        ).numpy()
        for c in padded
    ]
    if min(float(s.min()) for s in sampled) < -pad - 1:  # OUTSIDE read somewhere
        raise ValueError("the field leaves the padded coordinate grid")
    return np.stack([s - c for s, c in zip(sampled, grid, strict=True)], -1).astype(np.float32)


def main(pairs_file: str, out_dir: str) -> None:
    pairs = json.load(open(pairs_file))
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for p in pairs:
        fixed, moving = voxel_image(p["fixed_image"]), voxel_image(p["moving_image"])
        start = time.perf_counter()
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
        seconds = time.perf_counter() - start
        try:
            disp = displacement(fixed, reg["fwdtransforms"])
        except ValueError as e:
            raise SystemExit(f"{p['moving_image']} -> {p['fixed_image']}: {e}") from None
        affine = nib.load(p["fixed_image"]).affine
        name = f"disp_{p['fixed_id']}_0000_{p['moving_id']}_0000.nii.gz"
        nib.save(nib.Nifti1Image(disp, affine), os.path.join(out_dir, name))
        rows.append((p["fixed_id"], p["moving_id"], f"{seconds:.4f}"))
        print(f"{name}: {seconds:.2f} s", flush=True)
    with open(os.path.join(out_dir, "timing.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("fixed_id", "moving_id", "seconds"), *rows])


if __name__ == "__main__":
    main(*sys.argv[1:3])
