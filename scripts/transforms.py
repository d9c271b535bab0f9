"""Transforms MONAI lacks: input checks with messages that name the file, and putting registration
outputs computed on a padded grid back on each image's own grid (``ToImageGridd``)."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.learn2reg import HU_MAX_MINIMUM, check_hounsfield

__all__ = ["CheckDivisibled", "CheckHounsfieldd", "CheckImageLabeld", "ToImageGridd", "pad_offsets"]


def source_name(x) -> str:
    meta = getattr(x, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class CheckImageLabeld(MapTransform):
    """Refuses images and label maps the registration cannot use, naming the file.

    Runs after ``LoadImaged`` + ``EnsureChannelFirstd``: expects ``image`` (C, H, W, D) and an
    optional ``label`` (1, H, W, D). Checks: 3-D, finite intensities, a non-constant image, a label
    map on the same voxel grid (shape, and affine within 1e-3) holding integer values in
    [0, num_labels).

    Args:
        num_labels: label classes including background.
        in_channels: expected image channels.
    """

    def __init__(self, num_labels: int, in_channels: int = 1, image_key: str = "image", label_key: str = "label"):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.num_labels, self.in_channels = int(num_labels), int(in_channels)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        d = dict(data)
        image = d[self.image_key]
        name = source_name(image)
        if image.ndim != 4 or image.shape[0] != self.in_channels:
            raise ValueError(
                f"{name}: expected a 3-D image with {self.in_channels} channel(s), got array shape {tuple(image.shape)}"
            )
        values = torch.as_tensor(image)
        if not torch.isfinite(values).all():
            raise ValueError(f"{name}: image has NaN or infinite voxels")
        if values.max() == values.min():
            raise ValueError(f"{name}: image is constant ({float(values.max())}); nothing to register")
        if self.label_key in d:
            label = d[self.label_key]
            lname = source_name(label)
            if tuple(label.shape) != (1, *image.shape[1:]):
                raise ValueError(
                    f"{lname}: label map shape {tuple(label.shape[1:])} differs from image {name} shape "
                    f"{tuple(image.shape[1:])}"
                )
            i_aff, l_aff = getattr(image, "affine", None), getattr(label, "affine", None)
            if i_aff is not None and l_aff is not None:
                i_aff, l_aff = np.asarray(torch.as_tensor(i_aff).cpu()), np.asarray(torch.as_tensor(l_aff).cpu())
                if not np.allclose(i_aff, l_aff, atol=1e-3):
                    raise ValueError(
                        f"{lname}: label map affine differs from image {name} affine (max difference "
                        f"{float(np.abs(i_aff - l_aff).max()):.4g}): the label is not on the image's voxel grid"
                    )
            lab = torch.as_tensor(label)
            if not torch.equal(lab, torch.round(lab)):
                raise ValueError(f"{lname}: label map has non-integer values")
            found = np.unique(lab.cpu().numpy()).astype(int)
            # plain ints in the message: numpy 2 would print "np.int64(3)"
            bad = [int(v) for v in found if v < 0 or v >= self.num_labels]
            if bad:
                raise ValueError(f"{lname}: label values {bad} outside 0..{self.num_labels - 1}")
        return d


class CheckHounsfieldd(MapTransform):
    """Refuses a CT image whose values are not Hounsfield units, naming the file: no voxel below
    ``max_minimum`` (default -500; air is about -1000 HU and every abdominal CT holds some), so it
    has not been rescaled (DICOM RescaleSlope / RescaleIntercept, NIfTI scl_slope / scl_inter) and its
    CT windows would be meaningless. The check of ``scripts.learn2reg.check_hounsfield``, which
    ``ct_pair`` also applies when it reads a scan. Runs after ``LoadImaged`` + ``EnsureChannelFirstd``.
    """

    def __init__(self, keys="image", max_minimum: float = HU_MAX_MINIMUM, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_minimum = float(max_minimum)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            check_hounsfield(d[key], source_name(d[key]), self.max_minimum)
        return d


class CheckDivisibled(MapTransform):
    """Refuses images whose spatial size is not a multiple of ``k`` (the network halves the grid
    ``log2(k)`` times), naming the file, instead of failing in the middle of a run."""

    def __init__(self, keys="image", k: int = 16, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.k = int(k)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[1:])
            if any(n % self.k for n in shape):
                raise ValueError(
                    f"{source_name(d[key])}: spatial size {shape} is not a multiple of {self.k}; pad or resample it "
                    f"(python -m scripts.ct_pair prepare writes grids that are)"
                )
        return d


_PADS = ("SpatialPad", "DivisiblePad", "BorderPad")


def pad_offsets(image) -> tuple[np.ndarray, tuple[int, ...]]:
    """Where the original image lies in a padded one: (voxels added before each spatial axis, the
    original spatial shape), read from the pad records MONAI keeps in ``image.applied_operations``
    (``SpatialPadd``, ``DivisiblePadd``, ``BorderPadd``). An image with no record was not padded.
    Any other spatial operation (crop, resampling) cannot be undone this way and is refused."""
    ops = list(getattr(image, "applied_operations", None) or [])
    offset = np.zeros(image.ndim - 1, dtype=int)
    for op in ops:
        padded = (op.get("extra_info") or {}).get("padded")
        if op.get("class") not in _PADS or padded is None:
            raise ValueError(
                f"{source_name(image)}: {op.get('class')} cannot be undone by cropping; only padding is supported here"
            )
        offset += np.array([before for before, _ in padded[1:]], dtype=int)
    shape = tuple(int(s) for s in ops[0]["orig_size"]) if ops else tuple(image.shape[1:])
    return offset, shape


class ToImageGridd(MapTransform):
    """Puts registration outputs computed on the padded common grid back on an image's own grid.

    Preprocessing pads both images of a pair (``SpatialPadd`` to the network's field of view, then
    ``DivisiblePadd`` to a multiple of 16); the network's field and the warped images live on that
    padded grid. For the reference image (``grid_key``, the fixed image for moving->fixed outputs):

    - ``images`` (C, H', W', D') are cropped to the reference's own (H, W, D);
    - ``fields`` (3, H', W', D'), displacements in voxels that sample the OTHER image
      (``other_key``), are cropped the same way and shifted by (reference pad - other pad), so that
      they index the other image's own array: ``x + u(x)`` in the reference's voxels lands at the
      other image's voxel, as the Learn2Reg evaluation reads it. Pairs padded alike (both images of
      one size) need no shift.

    Every output gets the reference's metadata with the affine of its own grid, its padding records
    removed, its ``key`` and ``fixed_id`` / ``moving_id`` from the data (``scripts.learn2reg.OutputName``
    makes the output file names from them).
    Missing keys are skipped (``ddf_fixed_to_moving`` exists only when asked for).
    """

    def __init__(self, images=(), fields=(), grid_key: str = "fixed_image", other_key: str = "moving_image") -> None:
        super().__init__([*images, *fields], allow_missing_keys=True)
        self.images, self.fields = tuple(images), tuple(fields)
        self.grid_key, self.other_key = grid_key, other_key

    def __call__(self, data):
        d = dict(data)
        ref = d[self.grid_key]
        offset, shape = pad_offsets(ref)
        shift = torch.as_tensor(offset - pad_offsets(d[self.other_key])[0], dtype=torch.float32)
        crop = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        affine = torch.as_tensor(ref.affine, dtype=torch.float64).clone()
        affine[:3, 3] = affine[:3, :3] @ torch.as_tensor(offset, dtype=torch.float64) + affine[:3, 3]
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key])
            value = value.as_tensor() if isinstance(value, MetaTensor) else value
            value = value[crop].contiguous()
            if key in self.fields:
                value = value + shift.to(value.device).view(-1, 1, 1, 1)
            ids = {"fixed_id": str(d.get("fixed_id")), "moving_id": str(d.get("moving_id"))}
            meta = {**ref.meta, "affine": affine, "key": key, **ids}
            d[key] = MetaTensor(value, meta=meta)
        return d
