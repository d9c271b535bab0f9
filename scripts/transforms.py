"""Input checks that MONAI's loading transforms do not make, with messages that name the file."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform


__all__ = ["CheckImageLabeld", "CheckHounsfieldd", "CheckDivisibled"]


def _name(x) -> str:
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
        name = _name(image)
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
            lname = _name(label)
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
    """Refuses a CT image whose values are not Hounsfield units, naming the file.

    Air is about -1000 HU and every abdominal CT contains some (outside the body, in the bowel); an
    image with no voxel below ``max_minimum`` (default -500) has almost certainly not been rescaled
    (DICOM RescaleSlope / RescaleIntercept, NIfTI scl_slope / scl_inter), and its CT windows would
    be meaningless. Runs after ``LoadImaged`` + ``EnsureChannelFirstd``.
    """

    def __init__(self, keys="image", max_minimum: float = -500.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_minimum = float(max_minimum)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            low, high = float(torch.as_tensor(d[key]).min()), float(torch.as_tensor(d[key]).max())
            if low > self.max_minimum:
                raise ValueError(
                    f"{_name(d[key])}: values {low:g}..{high:g} do not look like Hounsfield units (no voxel below "
                    f"{self.max_minimum:g}; air is about -1000 HU): apply the rescale slope/intercept first"
                )
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
                    f"{_name(d[key])}: spatial size {shape} is not a multiple of {self.k}; pad or resample it "
                    f"(python -m scripts.ct_pair prepare writes grids that are)"
                )
        return d

