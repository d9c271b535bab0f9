"""Atlas-based segmentation with this bundle's registration network, as a MONAI Label infer task.

The datastore image is the FIXED image. Each atlas (an image with its label map) is registered onto
it by the bundle's network (moving = atlas), the atlas label map is warped with nearest neighbour,
and the warped label maps are combined by majority vote. The result goes back to the image's own
voxel grid (MONAI's inverse of the bundle's padding, SpatialPadd and DivisiblePadd) with the image's affine.

Everything model-related comes from the bundle, parsed with ``monai.bundle.ConfigParser`` from
``configs/inference.json`` (the keys MONAI Label's bundle tasks read: ``network_def``,
``preprocessing``, ``postprocessing``, ``inferer``, ``bundle_root``; the registration runs through
``test_time_inferer``, what ``inference.json``'s evaluator runs, so its test-time settings apply here
too), the weights from ``models/model.pt`` (loaded by MONAI Label's ``BasicInferTask``, strict), the warping from
``scripts.deformation`` and the label names from ``network_data_format.outputs.pred.label_def`` in
``configs/metadata.json``.

Why not MONAI Label's ``BundleInferTask``: it runs one network on one image and writes that
network's output, where registration needs two images per forward pass and a label map that is not
the network's output; and its module imports torchvision, whose PyPI wheels are CUDA builds that
cannot load their operators next to the CPU build of torch used here.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, SpatialPadd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.class_utils import unload_module
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

__all__ = ["AtlasRegistration", "InvalidRequestError", "default_atlas_dir", "majority_vote"]


class InvalidRequestError(ValueError):
    """A request this task cannot serve because of its input (image or parameters); the message says why.

    The app turns it into an HTTP 4xx response carrying the message.
    """


def default_atlas_dir(bundle_path: str) -> str:
    return os.path.join(bundle_path, "sample_data", "HippocampusMR")


def _root_message(e: BaseException) -> str:
    """The innermost cause of a (possibly wrapped) exception, as ``Type: message``."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def majority_vote(label_maps: Sequence[torch.Tensor], num_labels: int) -> torch.Tensor:
    """Voxel-wise majority vote of integer label maps of one shape.

    Ties go to the lowest label value (background first): with two atlases, a voxel is foreground
    only where both agree on its label.
    """
    if not label_maps:
        raise ValueError("majority_vote needs at least one label map")
    votes = torch.zeros((num_labels, *label_maps[0].shape), dtype=torch.int32, device=label_maps[0].device)
    for lab in label_maps:
        votes.scatter_add_(0, lab.long()[None], torch.ones_like(lab, dtype=torch.int32)[None])
    return votes.argmax(0)  # first maximum = lowest label on ties


class CheckHippocampusMRd:
    """Refuses images this task cannot segment, before the bundle pads / crops them.

    - Larger than the network's field of view (the bundle's ``spatial_size``) along any axis: the
      bundle centre pads or crops every image to ``spatial_size`` and the atlases are hippocampus
      crops of about 35x50x35 voxels, so a whole-head MRI or an abdominal CT would be cut to a box the
      atlases do not describe.
    - CT intensities: more than 1 % of the voxels below -50 (fat is about -100 and air -1000 in
      Hounsfield units). MRI magnitudes are not negative (all 200 MSD Task04 images have minimum
      >= 0) and a z-scored MRI stays within a few units of 0. A CT crop holding only organs above
      -50 HU passes this check: it is a guard against the wrong kind of image, not a classifier.
    """

    def __init__(
        self, spatial_size: Sequence[int], key: str = "image", ct_threshold: float = -50.0, ct_fraction: float = 0.01
    ) -> None:
        self.spatial_size = [int(s) for s in spatial_size]
        self.key, self.ct_threshold, self.ct_fraction = key, float(ct_threshold), float(ct_fraction)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        image = data[self.key]
        shape = [int(s) for s in image.shape[1:]]
        if any(s > m for s, m in zip(shape, self.spatial_size, strict=True)):
            raise InvalidRequestError(
                f"image of {'x'.join(map(str, shape))} voxels is larger than the "
                f"{'x'.join(map(str, self.spatial_size))} field of view of the registration network: this task "
                "expects a hippocampus MRI crop like those of MSD Task04 / Learn2Reg HippocampusMR "
                "(about 35x50x35 voxels at 1 mm)"
            )
        low = float((torch.as_tensor(image) < self.ct_threshold).float().mean())
        if low > self.ct_fraction:
            raise InvalidRequestError(
                f"{100 * low:.1f} % of the voxels are below {self.ct_threshold:g}: this looks like a CT in "
                "Hounsfield units (fat, air), and this task segments the hippocampus in MRI"
            )
        return data


class CheckImageGridd:
    """Last post step: the vote, already mapped back by the inverse of the bundle's padding, must lie
    on the input image's grid; drop the channel and hand the image's own affine to the writer."""

    def __init__(self, key: str = "pred", ref: str = "image") -> None:
        self.key, self.ref = key, ref

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        pred, ref = d[self.key], d[self.ref]
        meta = ref.meta if isinstance(ref, MetaTensor) else d.get(f"{self.ref}_meta_dict", {})
        shape = tuple(int(s) for s in meta.get("spatial_shape", ref.shape[1:]))
        if tuple(pred.shape[1:]) != shape:
            raise RuntimeError(f"label map of shape {tuple(pred.shape[1:])} is not on the image grid {shape}")
        affine = meta.get("original_affine", getattr(pred, "affine", None))
        if isinstance(pred, MetaTensor) and affine is not None:
            if not np.allclose(np.asarray(pred.affine, dtype=float), np.asarray(affine, dtype=float), atol=1e-4):
                raise RuntimeError("label map affine differs from the image affine after undoing the padding")
        d[self.key] = pred[0]
        d[f"{self.key}_meta_dict"] = {"affine": affine}
        return d


class AtlasRegistration(BasicInferTask):
    """Infer task "atlas_registration" (type segmentation).

    Args:
        bundle_path: the bundle folder (``configs/inference.json``, ``configs/metadata.json``,
            ``models/model.pt``, ``scripts/``).
        conf: the app's ``--conf`` options (``preload`` is honoured).
        atlas_dir: a Learn2Reg or MSD folder of labelled atlases (default: the bundle's
            ``sample_data/HippocampusMR``, 8 MSD Task04 cases).
        num_atlases: how many atlases to use (the first ones by case id); default all. A request can
            override it with the ``num_atlases`` parameter.

    Request parameters (besides MONAI Label's own): ``num_atlases`` (int: the first ones by id),
    ``atlases`` (a list of atlas ids, or one comma-separated string; overrides ``num_atlases``),
    ``register`` (default true; false skips the network and only pads/crops the atlas labels onto
    the image: the no-registration baseline).
    """

    CONFIG = "inference.json"
    METADATA = "metadata.json"
    WEIGHTS = "model.pt"

    def __init__(
        self,
        bundle_path: str,
        conf: dict[str, str] | None = None,
        atlas_dir: str | None = None,
        num_atlases: int | None = None,
    ) -> None:
        conf = conf or {}
        self.bundle_path = os.path.realpath(bundle_path)
        config_file = os.path.join(self.bundle_path, "configs", self.CONFIG)
        weights = os.path.join(self.bundle_path, "models", self.WEIGHTS)
        for needed in (config_file, weights):
            if not os.path.isfile(needed):
                raise FileNotFoundError(f"{needed}: missing; bundle_path must be this bundle's folder")

        self.bundle_config = ConfigParser()
        self.bundle_config.read_config(config_file)
        self.bundle_config["bundle_root"] = self.bundle_path
        with open(os.path.join(self.bundle_path, "configs", self.METADATA)) as f:
            metadata = json.load(f)
        label_def = metadata["network_data_format"]["outputs"]["pred"]["label_def"]
        self.num_labels = len(label_def)
        # MONAI Label wants {name: value}, background left out
        labels = {
            name: int(value) for value, name in sorted(label_def.items(), key=lambda kv: int(kv[0])) if int(value) != 0
        }

        with self._bundle_on_path():
            network = self.bundle_config.get_parsed_content("network_def", instantiate=True)
            self._deformation = importlib.import_module("scripts.deformation")
            learn2reg = importlib.import_module("scripts.learn2reg")
        self.spatial_size = [int(s) for s in self.bundle_config.get_parsed_content("spatial_size")]

        super().__init__(
            path=weights,
            network=network,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description=(
                "Atlas-based segmentation: registers labelled atlases onto the image with the bundle's "
                "spatial-gradient network and fuses their warped label maps by majority vote"
            ),
            load_strict=True,
            preload=strtobool(conf.get("preload", "false")),
        )
        self.version = metadata.get("version")

        self.atlas_dir = os.path.realpath(atlas_dir or default_atlas_dir(self.bundle_path))
        self.atlas_cases = learn2reg.training_cases(self.atlas_dir, exclude_val=False)
        self.max_atlases = len(self.atlas_cases)
        self.default_num_atlases = self._num_atlases(num_atlases if num_atlases is not None else self.max_atlases)
        self._config.update({"num_atlases": self.default_num_atlases})
        self._atlas_cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._atlas_lock = threading.Lock()
        logger.info(
            f"atlas_registration: {self.max_atlases} atlases in {self.atlas_dir} "
            f"(default {self.default_num_atlases}); labels {self.labels}"
        )

    # ---------------------------------------------------------------- helpers

    @contextmanager
    def _bundle_on_path(self):
        """The bundle's ``scripts`` package importable (as MONAI Label's bundle tasks do it)."""
        sys.path.insert(0, self.bundle_path)
        unload_module("scripts")
        try:
            yield
        finally:
            sys.path.remove(self.bundle_path)

    def _parsed(self, key: str, fresh: bool = False):
        with self._bundle_on_path():
            return self.bundle_config.get_parsed_content(key, instantiate=True, lazy=not fresh)

    def _num_atlases(self, value: Any) -> int:
        try:
            n = int(value)
            if str(value).strip() != str(n):
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidRequestError(f"num_atlases must be a whole number, got {value!r}") from None
        if not 1 <= n <= self.max_atlases:
            raise InvalidRequestError(
                f"num_atlases must be between 1 and {self.max_atlases} (atlases in {self.atlas_dir}), got {n}"
            )
        return n

    def _atlas_ids(self, value: Any) -> list[str]:
        ids = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise InvalidRequestError(
                f"atlases must be a list of atlas ids (or one comma-separated string), got {value!r}"
            )
        known = [c["id"] for c in self.atlas_cases]
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise InvalidRequestError(f"atlases {unknown} are not in {self.atlas_dir} (atlas ids: {', '.join(known)})")
        return list(dict.fromkeys(ids))

    def _atlases(self, ids: Sequence[str], device: str) -> list[dict[str, Any]]:
        """The atlases ``ids``, preprocessed by the bundle's own ``preprocessing``, on ``device`` (cached)."""
        with self._atlas_lock:
            cached = self._atlas_cache.setdefault(device, {})
            missing = [c for c in self.atlas_cases if c["id"] in ids and c["id"] not in cached]
            if missing:
                preprocessing = self._parsed("preprocessing", fresh=True)
                for case in missing:
                    try:
                        item = preprocessing({"image": case["image"], "label": case["label"]})
                    except Exception as e:
                        raise RuntimeError(f"atlas {case['image']} cannot be used: {_root_message(e)}") from e
                    cached[case["id"]] = {
                        "id": case["id"],
                        "image": torch.as_tensor(item["image"]).float()[None].to(device),
                        "label": torch.as_tensor(item["label"]).long()[None].to(device),
                    }
            return [cached[i] for i in ids]

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        return i

    # ---------------------------------------------------------------- MONAI Label hooks

    def __call__(self, request, callbacks=None):
        # parameters first: a bad one is refused before any work
        request = dict(request)
        if request.get("atlases"):
            request["atlases"] = self._atlas_ids(request["atlases"])
        else:
            n = self._num_atlases(request.get("num_atlases", self.default_num_atlases))
            request["atlases"] = [c["id"] for c in self.atlas_cases[:n]]
        register = request.get("register", True)
        if isinstance(register, str):
            if register.lower() not in ("true", "false", "1", "0"):
                raise InvalidRequestError(f"register must be true or false, got {register!r}")
            register = register.lower() in ("true", "1")
        request["register"] = bool(register)
        return super().__call__(request, callbacks)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        pre = self._parsed("preprocessing")
        pre = list(pre.transforms) if isinstance(pre, Compose) else list(pre)
        # refuse images the atlases do not cover, before they are padded
        at = next((i for i, t in enumerate(pre) if isinstance(t, SpatialPadd)), len(pre))
        pre.insert(at, CheckHippocampusMRd(self.spatial_size))
        return pre

    def run_pre_transforms(self, data: dict[str, Any], transforms):
        name = data.get("image_path", data.get("image"))
        try:
            return super().run_pre_transforms(data, transforms)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{name}: {e}") from e
        except Exception as e:
            # the bundle's checks (scripts.transforms.CheckImageLabeld) and MONAI's loaders say what is
            # wrong: 2-D / 4-D images, NaN, constant images, unreadable files
            message = _root_message(e)
            where = "" if str(name) in message else f"{name}: "
            raise InvalidRequestError(f"{where}cannot be used as a 3-D hippocampus MRI: {message}") from e

    def inverse_transforms(self, data=None):
        return []  # every invertible pre-transform: the bundle's SpatialPadd and DivisiblePadd

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        fixed = data[self.input_key]
        if not isinstance(fixed, MetaTensor):
            raise RuntimeError("the preprocessed image lost its metadata; cannot map the result back to its grid")
        atlases = self._atlases(data["atlases"], device)
        network = self._get_network(device, data) if data["register"] else None
        # the evaluator's inferer in inference.json: its test-time options (flips, ensemble, smoothing...)
        # apply to the app as they do to the bundle's own inference; with the defaults it is ``inferer``
        inferer = self._parsed("test_time_inferer")
        fixed_batch = fixed.as_tensor().float()[None].to(device)
        warped = []
        with torch.no_grad():
            for atlas in atlases:
                if network is None:
                    warped.append(atlas["label"][0, 0])
                    continue
                # the bundle's network input: [moving, fixed] on channels -> moving->fixed DDF (voxels)
                ddf = inferer(torch.cat([atlas["image"], fixed_batch], dim=1), network)
                warped.append(self._deformation.warp_labels_nearest(atlas["label"], ddf)[0, 0])
        vote = majority_vote(warped, self.num_labels).to(torch.uint8)[None].cpu()
        # the image's metadata and applied operations, so that the bundle's padding can be inverted
        pred = MetaTensor(
            vote, meta=copy.deepcopy(fixed.meta), applied_operations=copy.deepcopy(fixed.applied_operations)
        )
        data[self.output_label_key] = pred
        data[self.output_json_key] = {
            "atlases": [a["id"] for a in atlases],
            "atlas_dir": self.atlas_dir,
            "registered": bool(data["register"]),
        }
        return data

    def post_transforms(self, data=None) -> Sequence[Callable]:
        # not the bundle's postprocessing: that writes registration outputs (fields, warped images)
        return [CheckImageGridd(self.output_label_key, self.input_key)]

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        return super().writer(data, extension=extension, dtype=dtype or np.uint8)
