"""Training pairs drawn on the fly: every case is the moving image once per epoch, with a random
fixed image (docs/method.md, "Data and preprocessing")."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset

from scripts.transforms import source_name

__all__ = ["PairDataset", "RandomPairDataset", "check_dataset"]


class RandomPairDataset(Dataset, Randomizable):
    """Item i = case i as the moving image + another case drawn at random as the fixed image.

    Args:
        cases: a dataset of preprocessed cases (e.g. a ``CacheDataset``), each a dict with at least
            ``image`` and optionally ``label``.
        transform: applied to the pair dict (keys ``moving_image``, ``fixed_image``,
            ``moving_label``, ``fixed_label``); random transforms on several keys draw their
            parameters once, so augmentation is identical for both images of the pair.
        keys: which keys of a case to carry into the pair.
        group_key: if given, the fixed image is drawn among the cases with the same value of this
            key (pretraining draws pairs within a cohort: ``"cohort"``).
        identity_prob: probability that the fixed image is the moving case itself (the same image and
            label, then the pair's augmentation: identical unless a transform draws per image, as
            ``--elastic_prob`` does). Such a pair is registered by the identity: it teaches the network
            what it never sees in pairs of two subjects. Its siamese encoder subtracts the two encodings,
            so for identical images the decoder sees zeros and returns one fixed field whatever the image;
            trained on pairs of distinct cases only, that field is not the identity. 0 (the default)
            draws no extra random number, so existing runs draw the same pairs.

    MONAI's DataLoader reseeds this dataset per worker through ``set_random_state``, which also
    reseeds the transform, so workers draw different pairs and augmentations.
    """

    def __init__(
        self,
        cases: Sequence[dict],
        transform: Callable | None = None,
        keys=("image", "label"),
        group_key: str | None = None,
        identity_prob: float = 0.0,
    ) -> None:
        if len(cases) < 2:
            raise ValueError(f"random pairs need at least 2 cases, got {len(cases)}")
        if not 0.0 <= float(identity_prob) <= 1.0:
            raise ValueError(f"identity_prob must be a probability in [0, 1], got {identity_prob!r}")
        self.cases, self.transform, self.keys = cases, transform, tuple(keys)
        self.identity_prob = float(identity_prob)
        self._fixed = 0
        self._groups: list[list[int]] | None = None
        if group_key is not None:
            # The raw list of a CacheDataset / PersistentDataset: no need to load the images.
            raw = getattr(cases, "data", cases)
            members: dict = {}
            for i in range(len(raw)):
                members.setdefault(raw[i][group_key], []).append(i)
            small = [g for g, m in members.items() if len(m) < 2]
            if small:
                raise ValueError(f"pairs are drawn within each {group_key}; {small} have a single case")
            self._groups = [members[raw[i][group_key]] for i in range(len(raw))]

    def __len__(self) -> int:
        return len(self.cases)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, moving_index: int) -> None:
        # Any case but the moving one (of the same group); the moving one itself with identity_prob.
        if self.identity_prob and self.R.random_sample() < self.identity_prob:
            self._fixed = moving_index
            return
        if self._groups is None:
            j = int(self.R.randint(len(self.cases) - 1))
            self._fixed = j + (j >= moving_index)
            return
        group = self._groups[moving_index]
        j = int(self.R.randint(len(group) - 1))
        others = [i for i in group if i != moving_index]
        self._fixed = others[j]

    def __getitem__(self, index: int) -> dict:
        self.randomize(index)
        moving, fixed = self.cases[index], self.cases[self._fixed]
        m_shape, f_shape = tuple(moving["image"].shape[1:]), tuple(fixed["image"].shape[1:])
        if m_shape != f_shape:
            raise ValueError(
                f"moving {source_name(moving['image'])} has shape {m_shape} and fixed {source_name(fixed['image'])} "
                f"{f_shape} after preprocessing: a training pair needs one grid (resample or pad the cases to "
                "one shape; train.json pads each case to --spatial_size, which must hold the largest image)"
            )
        pair = {f"moving_{k}": moving[k] for k in self.keys if k in moving}
        pair.update({f"fixed_{k}": fixed[k] for k in self.keys if k in fixed})
        return apply_transform(self.transform, pair) if self.transform is not None else pair


class PairDataset(Dataset):
    """A fixed list of pairs; each image (and label map) goes through the per-case ``transform``.

    Args:
        pairs: dicts with ``fixed_image``, ``moving_image``, optional ``fixed_label`` /
            ``moving_label`` and any other keys (ids), which are passed through unchanged.
        transform: the per-case preprocessing, on keys ``image`` and ``label`` (the same one the
            training cases use, so both paths share one definition).
    """

    def __init__(self, pairs: Sequence[dict], transform: Callable) -> None:
        self.pairs, self.transform = list(pairs), transform

    def __len__(self) -> int:
        return len(self.pairs)

    def case(self, index: int, role: str) -> dict:
        """The ``image`` (and ``label``) paths or arrays of the ``role`` ("fixed" or "moving") image of
        pair ``index``, before preprocessing."""
        pair = self.pairs[index]
        return {k: pair[f"{role}_{k}"] for k in ("image", "label") if f"{role}_{k}" in pair}

    def __getitem__(self, index: int) -> dict:
        pair = dict(self.pairs[index])
        for role in ("moving", "fixed"):
            case = {k: pair.pop(f"{role}_{k}") for k in ("image", "label") if f"{role}_{k}" in pair}
            try:
                case = apply_transform(self.transform, case)
            except Exception as e:
                # Some readers' errors (a truncated gzip) do not say which file they were reading.
                files = " and ".join(str(v) for v in case.values())
                raise ValueError(f"{role} {files}: {_root_cause(e)}") from e
            pair.update({f"{role}_{k}": v for k, v in case.items()})
        return pair


def check_dataset(dataset: PairDataset, max_voxels: int | None = None, progress_seconds: float = 10.0) -> PairDataset:
    """Loads and preprocesses every image of a pair list once, before any output is written, so that a
    bad file stops the run early with a message naming it. Then checks each pair: both images must
    come out of the preprocessing on one grid (the network takes them together), of at most
    ``max_voxels`` voxels. Returns ``dataset``.

    An image used by several pairs is checked once. A line of progress is printed every
    ``progress_seconds`` (a list of 10,000 pairs takes minutes). MONAI wraps a transform's exception
    in layers of RuntimeError; the innermost message is re-raised as a ValueError naming the files.
    """
    shapes: dict[tuple, tuple] = {}  # an image's (image, label) paths -> its preprocessed shape
    start = last = time.monotonic()

    def shape_of(i: int, role: str) -> tuple:
        case = dataset.case(i, role)
        key = tuple(sorted((k, str(v)) for k, v in case.items()))
        if key not in shapes:
            try:
                shapes[key] = tuple(apply_transform(dataset.transform, dict(case))["image"].shape[1:])
            except Exception as e:
                files = " and ".join(str(v) for v in case.values())
                raise ValueError(f"input {i + 1} of {len(dataset)}, {role} {files}: {_root_cause(e)}") from e
        return shapes[key]

    for i in range(len(dataset)):
        fixed, moving = shape_of(i, "fixed"), shape_of(i, "moving")
        f_path, m_path = dataset.case(i, "fixed")["image"], dataset.case(i, "moving")["image"]
        if fixed != moving:
            raise ValueError(
                f"input {i + 1} of {len(dataset)}: fixed {f_path} becomes {fixed} and moving {m_path} becomes "
                f"{moving} after preprocessing; register images that share one grid (resample or pad them first)"
            )
        if max_voxels is not None and math.prod(fixed) > max_voxels:
            raise ValueError(
                f"input {i + 1} of {len(dataset)}: fixed {f_path} is {'x'.join(map(str, fixed))} voxels after "
                f"padding, more than max_voxels={max_voxels}: crop or resample the images (scripts.ct_pair "
                "prepare for CT), or raise --max_voxels if the memory allows"
            )
        if time.monotonic() - last > progress_seconds:
            last = time.monotonic()
            print(f"checked {i + 1} of {len(dataset)} pairs ({len(shapes)} images, {last - start:.0f} s)", flush=True)
    return dataset


def _root_cause(e: BaseException) -> BaseException:
    # Unwrap only MONAI's RuntimeError layers: stop at our own ValueError (PairDataset's, which names
    # the file the innermost reader error may not name).
    while isinstance(e, RuntimeError) and e.__cause__ is not None:
        e = e.__cause__
    return e
