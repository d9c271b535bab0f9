"""Convert a Medical Segmentation Decathlon (MSD) Task04-style folder into the Learn2Reg layout.

Command line (from the bundle root)::

    python -m scripts.convert --msd_dir /data/Task04_Hippocampus --out_dir /data/HippocampusMR [--num_val 40]
    # options: --task HippocampusMR --size "[64,64,64]" --ids "[331,338,351]"

Input: ``msd_dir/dataset.json`` with a ``training`` list of
``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``.

Output, written into a temporary folder next to ``out_dir`` and renamed into place only when
everything succeeded (a failure never leaves a half-written ``out_dir``):

- ``imagesTr/<task>_<id4>_0000.nii.gz`` (float32) and ``labelsTr/<same name>`` (uint8), where id4
  is the MSD case number on 4 digits (``hippocampus_017`` -> ``HippocampusMR_0017_0000.nii.gz``).
  Every volume is centre padded / cropped with zeros to ``size`` by
  ``monai.transforms.ResizeWithPadOrCrop``; the affine is updated for the padding (the voxel grid
  stays physically consistent). No reorientation, no resampling: the array axes stay the raw NIfTI
  axes, and the voxel values are unchanged (no intensity normalisation).
- ``<task>_dataset.json`` (docs/method.md): ``name``, ``tensorImageShape``, ``labels``,
  ``modality``, ``training``, ``test`` ([]), ``training_paired_images`` ([]),
  ``registration_val`` (the last ``num_val`` cases by id, each fixed id paired with the reversed
  list, as Learn2Reg HippocampusMR), ``registration_test`` ([]), ``numRegistration_val``, plus
  ``description``, ``licence`` and ``reference``.

All inputs are validated (headers read with nibabel) before anything is written; the input files
are only read. An existing non-empty ``out_dir`` is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from scripts.files import check_output_dir, staged_dir
from scripts.learn2reg import nifti_header

__all__ = ["ConversionError", "msd_to_learn2reg"]

MSD_LICENCE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
MSD_REFERENCES = [
    'A. L. Simpson et al., "A large annotated medical image dataset for the development and evaluation '
    'of segmentation algorithms", arXiv:1902.09063, 2019.',
    'M. Antonelli et al., "The Medical Segmentation Decathlon", Nature Communications 13:4128, 2022.',
]
# Learn2Reg HippocampusMR label names, used only when the MSD dataset.json has no "labels".
HIPPOCAMPUS_LABELS = {"0": "background", "1": "head", "2": "tail"}


class ConversionError(ValueError):
    """An input that cannot be converted, or an output folder that must not be touched; the
    message names the file."""


def _case_number(path: str) -> int:
    """MSD case number from a file name: ``./imagesTr/hippocampus_017.nii.gz`` -> 17."""
    match = re.search(r"(\d+)$", os.path.basename(path).split(".")[0])
    if match is None:
        raise ConversionError(f"{path}: cannot read a case number from the file name")
    return int(match.group(1))


def _parse_ids(ids) -> set[int] | None:
    """``None``, an int, a list/tuple of ints or digit strings, or a comma-separated string."""
    if ids is None:
        return None
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    elif isinstance(ids, str):
        ids = [s for s in re.split(r"[,\s]+", ids.strip("[]() ")) if s]
    out = set()
    for i in ids:
        try:
            out.add(int(str(i).strip()))
        except ValueError:
            raise ConversionError(f"ids: {i!r} is not a case number") from None
    if not out:
        raise ConversionError("ids: empty selection")
    return out


def _parse_size(size) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ConversionError(f"size must be 3 positive integers, got {size!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ConversionError(f"size must be 3 positive integers, got {size!r}")
    return out


def _check_header(path: str) -> nib.Nifti1Image:
    return nifti_header(path, ConversionError)


def _validate(msd_dir: str, wanted: set[int] | None) -> tuple[dict, list[dict]]:
    """Read dataset.json and every header; returns (MSD index, cases sorted by case number)."""
    index_path = os.path.join(msd_dir, "dataset.json")
    if not os.path.isdir(msd_dir):
        raise ConversionError(f"{msd_dir}: MSD folder does not exist")
    if not os.path.isfile(index_path):
        raise ConversionError(f"{index_path}: missing (an MSD folder needs a dataset.json)")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{index_path}: not a readable JSON file ({e})") from e
    training = index.get("training") if isinstance(index, dict) else None
    if not isinstance(training, list) or not training:
        raise ConversionError(f"{index_path}: needs a non-empty 'training' list of {{'image', 'label'}} entries")

    cases, seen = [], {}
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            raise ConversionError(f"{index_path}: training entry {i} needs 'image' and 'label' paths, got {entry!r}")
        number = _case_number(entry["image"])
        if number in seen:
            raise ConversionError(
                f"{index_path}: case number {number} appears twice ({seen[number]}, {entry['image']})"
            )
        seen[number] = entry["image"]
        if wanted is not None and number not in wanted:
            continue
        if number > 9999:
            raise ConversionError(f"{entry['image']}: case number {number} does not fit the 4-digit Learn2Reg id")
        image, label = (os.path.normpath(os.path.join(msd_dir, entry[k])) for k in ("image", "label"))
        img, lab = _check_header(image), _check_header(label)
        if img.shape != lab.shape:
            raise ConversionError(f"{label}: label shape {lab.shape} differs from image shape {img.shape} ({image})")
        if not np.allclose(img.affine, lab.affine, atol=1e-3):
            raise ConversionError(f"{label}: label affine differs from the image affine ({image})")
        cases.append({"number": number, "image": image, "label": label})
    if wanted is not None:
        missing = sorted(wanted - {c["number"] for c in cases})
        if missing:
            raise ConversionError(f"{index_path}: ids {missing} are not in the training list")
    cases.sort(key=lambda c: c["number"])
    return index, cases


def _save(array: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image, path: str) -> None:
    """Save with a fresh header (no inherited scaling); keep the source's xform codes and units."""
    out = nib.Nifti1Image(array, affine)
    hdr = like.header
    code = int(hdr["sform_code"]) or int(hdr["qform_code"]) or 2
    out.set_sform(affine, code=code)
    out.set_qform(affine, code=code)
    out.header.set_xyzt_units(*hdr.get_xyzt_units())
    out.header.set_data_dtype(array.dtype)
    nib.save(out, path)


def _convert_case(case: dict, name: str, size: tuple[int, int, int], label_keys: set[int] | None, tmp: str) -> None:
    from monai.transforms import LoadImage, ResizeWithPadOrCrop

    load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
    resize = ResizeWithPadOrCrop(spatial_size=size)
    for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
        src = case[key]
        data = load(src)
        out = resize(data)
        array = out[0].numpy()
        affine = np.asarray(out.affine, dtype=np.float64)
        if key == "image":
            array = array.astype(np.float32)
        else:
            values = np.unique(array)
            if not np.all(values == np.round(values)) or values.min() < 0 or values.max() > 255:
                raise ConversionError(f"{src}: label values must be integers in 0..255, got {values[:10].tolist()}")
            if label_keys is not None and not set(values.astype(int).tolist()) <= label_keys:
                raise ConversionError(
                    f"{src}: label values {sorted(set(values.astype(int).tolist()) - label_keys)} are not in "
                    f"the dataset.json labels {sorted(label_keys)}"
                )
            kept, before = np.count_nonzero(array), np.count_nonzero(data.numpy())
            if kept != before:
                warnings.warn(f"{src}: cropping to {size} removed {before - kept} labelled voxels", stacklevel=3)
            array = array.astype(np.uint8)
        _save(np.ascontiguousarray(array), affine, nib.load(src), os.path.join(tmp, folder, name))


def msd_to_learn2reg(
    msd_dir: str,
    out_dir: str,
    task: str = "HippocampusMR",
    size: Sequence[int] = (64, 64, 64),
    num_val: int = 40,
    ids=None,
) -> str:
    """Convert an MSD Task04-style folder into a Learn2Reg dataset folder (see the module docstring).

    Args:
        msd_dir: folder with ``dataset.json``, ``imagesTr/``, ``labelsTr/``.
        out_dir: the Learn2Reg folder to create (must not exist, or be empty).
        task: task name used in file names and the JSON name (``<task>_dataset.json``).
        size: spatial size every volume is centre padded / cropped to.
        num_val: how many cases (the last ids) form the validation pairs; even, and at least 2
            cases must remain for training.
        ids: optional MSD case numbers to convert (e.g. ``[331, 338]``); default all.

    Returns:
        ``out_dir``.

    Raises:
        ConversionError: bad input (the message names the file) or a non-empty ``out_dir``; nothing
            is written in that case.
    """
    if not isinstance(task, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", task):
        raise ConversionError(f"task must be a name of letters, digits and '-', got {task!r}")
    size = _parse_size(size)
    wanted = _parse_ids(ids)
    msd_dir, out_dir = os.path.abspath(str(msd_dir)), os.path.abspath(str(out_dir))
    try:
        check_output_dir(out_dir, overwrite=False, overwrite_option=None)  # before reading anything
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise ConversionError(str(e)) from e

    index, cases = _validate(msd_dir, wanted)
    if isinstance(num_val, bool) or not isinstance(num_val, (int, np.integer)):
        raise ConversionError(f"num_val must be an integer, got {num_val!r}")
    if len(cases) < 4:
        raise ConversionError(
            f"{msd_dir}: {len(cases)} case(s) selected; at least 4 are needed (2 to validate, 2 to train)"
        )
    if not 2 <= num_val <= len(cases) - 2:
        raise ConversionError(
            f"num_val must be between 2 and {len(cases) - 2} (at least 2 of the {len(cases)} cases must remain "
            f"for training), got {num_val}"
        )
    if num_val % 2:
        raise ConversionError(
            f"num_val must be even (the middle case of an odd list would be paired with itself), got {num_val}"
        )

    msd_labels = index.get("labels")
    if isinstance(msd_labels, dict) and msd_labels:
        if not all(str(k).isdigit() for k in msd_labels):
            raise ConversionError(
                f"{os.path.join(msd_dir, 'dataset.json')}: 'labels' keys must be label values, got {list(msd_labels)}"
            )
        label_names = {str(int(k)): str(v) for k, v in sorted(msd_labels.items(), key=lambda kv: int(kv[0]))}
        label_keys = {int(k) for k in label_names}
    else:
        label_names, label_keys = dict(HIPPOCAMPUS_LABELS), None
    modality = index.get("modality") if isinstance(index.get("modality"), dict) else {"0": "MRI"}
    names = {c["number"]: f"{task}_{c['number']:04d}_0000.nii.gz" for c in cases}

    try:
        staging = staged_dir(out_dir)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise ConversionError(str(e)) from e
    with staging as tmp:
        for folder in ("imagesTr", "labelsTr"):
            os.mkdir(os.path.join(tmp, folder))
        for case in cases:
            _convert_case(case, names[case["number"]], size, label_keys, tmp)

        image = lambda n: f"./imagesTr/{names[n]}"  # noqa: E731
        val = [c["number"] for c in cases[-num_val:]]
        msd_name = index.get("name", "MSD")
        licence = index.get("licence") or "CC-BY-SA 4.0"
        dataset = {
            "name": task,
            "description": (
                f"{task}: converted from the Medical Segmentation Decathlon (MSD) Task04-style dataset "
                f"{msd_name!r} ({index.get('description', 'no description')}) by scripts/convert.py: MSD case "
                f"numbers kept as ids, every volume centre padded/cropped with zeros to {list(size)} "
                "(monai ResizeWithPadOrCrop, affine updated), no resampling, no reorientation, "
                "no intensity normalisation."
            ),
            "licence": (
                f"{licence} ({MSD_LICENCE_URL}), Medical Segmentation Decathlon data; redistribution must "
                "keep this notice and share alike."
            ),
            "reference": MSD_REFERENCES,
            "tensorImageSize": {"0": "3D"},
            "tensorImageShape": {"0": list(size)},
            "modality": modality,
            "labels": {"0": label_names},
            "pairings": "unpaired",
            "provided_data": {"0": ["image", "label"]},
            "numTraining": len(cases),
            "numTest": 0,
            "training": [{"image": image(n), "label": f"./labelsTr/{names[n]}"} for n in names],
            "test": [],
            "numPairedTraining": 0,
            "training_paired_images": [],
            "numRegistration_val": len(val),
            "registration_val": [{"fixed": image(f), "moving": image(m)} for f, m in zip(val, val[::-1], strict=True)],
            "numRegistration_test": 0,
            "registration_test": [],
        }
        with open(os.path.join(tmp, f"{task}_dataset.json"), "w") as f:
            json.dump(dataset, f, indent=4)
            f.write("\n")
    return out_dir


if __name__ == "__main__":
    import sys

    import fire

    try:
        fire.Fire(msd_to_learn2reg)
    except ConversionError as e:
        sys.exit(f"error: {e}")
