"""Input checks that MONAI's loading transforms do not make, with messages that name the file."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform


__all__ = ["CheckImageLabeld"]


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
