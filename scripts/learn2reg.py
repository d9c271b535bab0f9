"""Reading Learn2Reg and Medical Segmentation Decathlon (MSD) dataset folders into cases and pairs.

Two layouts are understood (docs/method.md, "Learn2Reg folders"):
- Learn2Reg: ``<Task>_dataset.json`` with ``training`` and ``registration_val`` / ``registration_test``
  pair lists; paths relative to the folder.
- MSD: ``dataset.json`` with a ``training`` list of image/label dicts and no pair list. The last
  ``num_val`` cases (sorted by id) are held out; validation pairs each of them with the reversed
  list, as Learn2Reg builds its hippocampus validation pairs.

A case is ``{"id", "image", "label"}``; a pair is ``{"fixed_id", "moving_id", "fixed_image",
"moving_image"}`` plus ``fixed_label`` / ``moving_label`` when label maps exist. All paths are
absolute. Ids are the case number as 4 digits ("0201"), as in Learn2Reg file names.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re

import nibabel as nib

__all__ = [
    "DatasetError",
    "HU_MAX_MINIMUM",
    "OutputName",
    "case_id",
    "check_hounsfield",
    "check_output_names",
    "disp_name",
    "nifti_header",
    "pairs",
    "read_index",
    "read_index_file",
    "training_cases",
]


class DatasetError(ValueError):
    """A dataset folder, index file or pair list that cannot be used; the message names the file."""


HU_MAX_MINIMUM = -500.0


def case_id(path: str) -> str:
    """The 4-digit case id of an image path: ``HippocampusMR_0201_0000.nii.gz`` -> "0201" (the
    last 4 digits are the modality), ``hippocampus_017.nii.gz`` -> "0017"."""
    name = os.path.basename(path).split(".")[0]
    name = re.sub(r"_(\d{4})_\d{4}$", r"_\1", name)
    match = re.search(r"(\d+)$", name)
    if match is None:
        raise DatasetError(f"{path}: cannot read a case number from the file name")
    return f"{int(match.group(1)):04d}"


def disp_name(fixed_id: str, moving_id: str, style: str = "long") -> str:
    """Learn2Reg displacement file name for a pair: "long" ``disp_<f>_0000_<m>_0000.nii.gz`` (the
    project convention) or "short" ``disp_<f>_<m>.nii.gz``, which the official
    ``MDL-UzL/L2R/evaluation/evaluation.py`` (commit e7eccac) requires for same-modality pairs."""
    if style not in ("long", "short"):
        raise ValueError(f"disp name style must be 'long' or 'short', got {style!r}")
    return (
        f"disp_{fixed_id}_{moving_id}.nii.gz" if style == "short" else f"disp_{fixed_id}_0000_{moving_id}_0000.nii.gz"
    )


class OutputName:
    """``output_name_formatter`` of MONAI's ``SaveImaged`` giving the bundle's output names from the
    ``key``, ``fixed_id`` and ``moving_id`` that ``scripts.transforms.ToImageGridd`` puts in each
    output's metadata:

    - ``ddf``: the Learn2Reg displacement file ``disp_<f>_0000_<m>_0000`` (``style="short"``:
      ``disp_<f>_<m>``); ``ddf_fixed_to_moving``: the same name for the reversed pair;
    - any other key, e.g. ``warped_image`` / ``warped_label``: ``<key>_<f>_<m>``.

    SaveImaged adds the extension (``output_ext``) and, with ``output_postfix=""``, nothing else."""

    def __init__(self, style: str = "long") -> None:
        disp_name("0", "0", style)  # refuse a bad style when the config is read
        self.style = style

    def name(self, key: str, fixed_id: str, moving_id: str) -> str:
        if key == "ddf":
            return disp_name(fixed_id, moving_id, self.style)[: -len(".nii.gz")]
        if key == "ddf_fixed_to_moving":
            return disp_name(moving_id, fixed_id, self.style)[: -len(".nii.gz")]
        return f"{key}_{fixed_id}_{moving_id}"

    def __call__(self, metadict: dict, saver=None) -> dict:
        return {
            "subject": self.name(metadict["key"], str(metadict["fixed_id"]), str(metadict["moving_id"])),
            "idx": None,
        }


def check_output_names(pairs: list[dict], style: str = "long", fixed_to_moving: bool = False) -> list[dict]:
    """Refuses, before any work, a pair list in which two pairs would write a file of the same name.

    Output names are made from the 4-digit case ids only (the Learn2Reg convention), so two
    different images with one case number (``a/X_0367_0000.nii.gz`` and ``b/X_0367_0000.nii.gz``),
    a pair listed twice, or (with ``fixed_to_moving``) a pair and its reverse would overwrite each
    other's results. The message names both pairs and their source paths. Returns ``pairs``."""
    out = OutputName(style)
    keys = ["ddf", "warped_image", "warped_label"] + (["ddf_fixed_to_moving"] if fixed_to_moving else [])
    seen: dict[str, tuple[int, str]] = {}
    for i, pair in enumerate(pairs):
        for key in keys:
            name = out.name(key, pair["fixed_id"], pair["moving_id"]) + ".nii.gz"
            j, other_key = seen.setdefault(name, (i, key))
            if j == i:
                continue
            a, b = pairs[j], pair
            same = a["fixed_image"] == b["fixed_image"] and a["moving_image"] == b["moving_image"]
            what = "is listed twice" if same else "and another pair would write the same file"
            if "ddf_fixed_to_moving" in (key, other_key):
                why = "with --write_fixed_to_moving True a pair also writes the field of its reverse: list each couple once"
            else:
                why = "output names use the 4-digit case ids only: remove the duplicate or give the images distinct case numbers"
            raise DatasetError(
                f"pair {j + 1} (fixed {a['fixed_image']}, moving {a['moving_image']}) {what}: pair {i + 1} (fixed "
                f"{b['fixed_image']}, moving {b['moving_image']}) would also write {name}; {why}"
            )
    return pairs


def check_hounsfield(values, name: str, max_minimum: float = HU_MAX_MINIMUM) -> None:
    """Refuses, naming ``name``, intensities that are not Hounsfield units: no voxel below
    ``max_minimum`` (air, about -1000 HU, is in every abdominal CT). The one check used by
    ``scripts.transforms.CheckHounsfieldd`` and by ``scripts.ct_pair.read_image`` (here, in a module
    without torch, so that ct_pair starts fast).

    Args:
        values: the image, any shape, in HU: a numpy array, an ITK array view or a torch tensor.
        name: the file, for the message.
        max_minimum: HU; an image whose minimum is above it is refused.
    """
    low, high = float(values.min()), float(values.max())
    if low > max_minimum:
        raise DatasetError(
            f"{name}: values {low:g}..{high:g} do not look like Hounsfield units (no voxel below {max_minimum:g}; "
            "air is about -1000 HU): apply the rescale slope/intercept first"
        )


def read_index(dataset_dir: str) -> tuple[str, dict]:
    """Find and parse the dataset JSON of a folder (``read_index_file``). Returns (json path, content)."""
    if not os.path.isdir(dataset_dir):
        raise DatasetError(f"{dataset_dir}: dataset folder does not exist")
    found = sorted(glob.glob(os.path.join(dataset_dir, "*_dataset.json")))
    if not found and os.path.isfile(os.path.join(dataset_dir, "dataset.json")):
        found = [os.path.join(dataset_dir, "dataset.json")]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise DatasetError(f"{dataset_dir}: expected one <Task>_dataset.json or dataset.json, found {what}")
    return found[0], read_index_file(found[0])


def read_index_file(path: str, error: type[Exception] = DatasetError) -> dict:
    """Parse a Learn2Reg ``<Task>_dataset.json`` or MSD ``dataset.json``; it must hold a non-empty
    ``training`` list. Raises ``error`` naming the file."""
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(index, dict) or not isinstance(index.get("training"), list) or not index["training"]:
        raise error(f"{path}: needs a non-empty 'training' list of {{'image', 'label'}} entries")
    return index


def nifti_header(path: str, error: type[Exception] = DatasetError, where: str = ""):
    """The nibabel image of a 3-D NIfTI file, from its header only (cheap: the voxels are not read),
    so that a bad file stops a run before any output. Raises ``error`` naming the file (and
    ``where`` it is listed) if it is missing, unreadable or not 3-D."""
    name = f"{path} ({where})" if where else path
    if not os.path.isfile(path):
        raise error(f"{name}: file does not exist")
    try:
        img = nib.load(path)
        shape = img.shape
    except Exception as e:  # nibabel raises several types for unreadable headers
        raise error(f"{name}: not a readable NIfTI image ({e})") from e
    if len(shape) != 3:
        raise error(f"{name}: expected a 3-D image, got shape {tuple(shape)}")
    return img


def _resolve(dataset_dir: str, index_path: str, rel: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{index_path}: expected a file path, got {rel!r}")
    path = rel if os.path.isabs(rel) else os.path.normpath(os.path.join(dataset_dir, rel))
    if not os.path.isfile(path):
        raise DatasetError(f"{index_path}: lists {rel}, which does not exist")
    return os.path.abspath(path)


def _label_for(image: str) -> str | None:
    """labelsTr/<same name> next to imagesTr/<name>, if it exists."""
    parent, name = os.path.split(image)
    label = os.path.join(os.path.dirname(parent), "labelsTr", name)
    return label if os.path.isfile(label) else None


def _all_cases(dataset_dir: str) -> tuple[str, dict, list[dict]]:
    path, index = read_index(dataset_dir)
    cases = []
    for i, entry in enumerate(index["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{path}: training entry {i} needs an 'image' (and optionally a 'label'), got {entry!r}")
        image = _resolve(dataset_dir, path, entry["image"])
        case = {"id": case_id(image), "image": image}
        if entry.get("label"):  # unlabelled scans train on the image terms only
            case["label"] = _resolve(dataset_dir, path, entry["label"])
        cases.append(case)
    cases.sort(key=lambda c: c["id"])
    ids = [c["id"] for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise DatasetError(f"{path}: several training images share the case ids {duplicated}")
    return path, index, cases


def _is_learn2reg(index: dict) -> bool:
    return "registration_val" in index


def _pair(fixed: str, moving: str) -> dict:
    pair = {"fixed_id": case_id(fixed), "moving_id": case_id(moving), "fixed_image": fixed, "moving_image": moving}
    fixed_label, moving_label = _label_for(fixed), _label_for(moving)
    if fixed_label and moving_label:
        pair.update(fixed_label=fixed_label, moving_label=moving_label)
    return pair


def _msd_val_cases(cases: list[dict], num_val: int, path: str) -> list[dict]:
    if not 2 <= num_val < len(cases):
        raise DatasetError(f"{path}: num_val must be between 2 and {len(cases) - 1}, got {num_val}")
    return cases[-num_val:]


def training_cases(dataset_dir: str, num_val: int = 40, exclude_val: bool = True) -> list[dict]:
    """Cases to train on: every labelled training case, minus those in the validation pairs."""
    path, index, cases = _all_cases(dataset_dir)
    if not exclude_val or (_is_learn2reg(index) and not index["registration_val"]):
        return cases
    held_out = set()
    for p in pairs(dataset_dir, "registration_val", num_val):
        held_out |= {p["fixed_image"], p["moving_image"]}
    kept = [c for c in cases if c["image"] not in held_out]
    if len(kept) < 2:
        raise DatasetError(f"{path}: fewer than 2 training cases are left outside the validation pairs")
    return kept


def validation_cases(dataset_dir: str, num_val: int = 40) -> list[dict]:
    """The labelled cases whose image is in a validation pair, each once in id order: the subjects that
    ``training_cases`` holds out, for validating a network trained on single images (segmentation)."""
    path, _, cases = _all_cases(dataset_dir)
    held_out = set()
    for p in pairs(dataset_dir, "registration_val", num_val):
        held_out |= {p["fixed_image"], p["moving_image"]}
    kept = [c for c in cases if c["image"] in held_out and "label" in c]
    if not kept:
        raise DatasetError(f"{path}: no labelled training case is in a validation pair: nothing to validate on")
    return kept


def pairs(dataset_dir: str, selection: str = "registration_val", num_val: int = 40) -> list[dict]:
    """The pairs to register.

    Args:
        dataset_dir: a Learn2Reg or MSD folder.
        selection: "registration_val", "registration_test", or the path of a user pair list: a CSV
            with a header ``fixed,moving`` or a JSON list of ``{"fixed", "moving"}``; paths
            absolute or relative to ``dataset_dir``.
        num_val: MSD folders only: how many cases (the last ids) form the validation pairs.
    """
    path, index, cases = _all_cases(dataset_dir)
    if selection in ("registration_val", "registration_test"):
        if not _is_learn2reg(index):
            if selection == "registration_test":
                raise DatasetError(f"{path}: an MSD dataset has no registration_test pairs; give a pair list file")
            val = [c["image"] for c in _msd_val_cases(cases, num_val, path)]
            return [_pair(f, m) for f, m in zip(val, val[::-1], strict=True) if f != m]
        entries, source = index.get(selection), path
    else:
        entries, source = _read_pair_file(selection), selection
    if not isinstance(entries, list):
        raise DatasetError(f"{source}: the pair list {selection} must be a list of {{'fixed', 'moving'}} entries")
    if not entries:
        raise DatasetError(f"{source}: the pair list {selection} is missing or empty")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("fixed") or not entry.get("moving"):
            raise DatasetError(f"{source}: pair {i + 1} needs a 'fixed' and a 'moving' path, got {entry!r}")
        out.append(_pair(_resolve(dataset_dir, source, entry["fixed"]), _resolve(dataset_dir, source, entry["moving"])))
    if _is_learn2reg(index):
        _check_same_grid(out)
    return out


def _shape(path: str) -> tuple:
    return tuple(nifti_header(path).shape)


def _check_same_grid(pairs: list[dict]) -> None:
    """Learn2Reg defines a pair on one voxel grid: the displacement file is H x W x D x 3 on the
    fixed grid and indexes the moving array directly, so padding two differently sized images to a
    common size would silently misalign them. (MSD cases differ in size and are padded: not checked.)
    Reads the headers only."""
    shapes: dict[str, tuple] = {}  # an image listed in many pairs is read once
    for p in pairs:
        for path in (p["fixed_image"], p["moving_image"]):
            if path not in shapes:
                shapes[path] = _shape(path)
        fixed, moving = shapes[p["fixed_image"]], shapes[p["moving_image"]]
        if fixed != moving:
            raise DatasetError(
                f"fixed {p['fixed_image']} has shape {fixed} but moving {p['moving_image']} has shape {moving}: "
                "a Learn2Reg pair must share one voxel grid"
            )


def _read_pair_file(path: str) -> list:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: pair list file does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            if path.lower().endswith(".json"):
                return json.load(f)
            rows = list(csv.DictReader(f))
    except (OSError, json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable pair list ({e})") from e
    if rows and not {"fixed", "moving"} <= set(rows[0]):
        raise DatasetError(f"{path}: the CSV header must name the columns 'fixed' and 'moving'")
    return rows
