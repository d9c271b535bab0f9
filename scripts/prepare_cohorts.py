"""Extra public CT cohorts on one common grid (docs/ct.md, "Pretraining and noisy labels"): every scan is resampled to 2 mm
isotropic and aligned to ONE reference scan (translation or affine registration, or the image
centres), so that scans of all cohorts can be paired and batched.

    python -m scripts.prepare_cohorts --cohorts cohorts.json --reference REF --out_dir DIR \\
        [--align translation|affine|center|none] [--spacing 2.0] [--size X Y Z] [--overwrite]

``cohorts.json`` is the cohort list of ``scripts.cohorts.load_cohorts`` (``name``, ``data``,
``labels``, ``annotated``); a case may also be a DICOM series folder (``data`` as a list of
``{"image": folder, "label": file}``). ``REF`` is a NIfTI file or a DICOM folder. The grid is
``ct_pair.common_grid(REF, spacing, "RAS", 16, size)``: the reference's extent (or ``size``
voxels) centred on it.

For each case the transform maps reference points to the case's points
(``ct_pair.prealign_transform(reference, case, align)``); the image is resampled linearly (air,
-1024 HU, outside the scan; stored as int16 HU) and the label map with nearest neighbour, keeping
the cohort's ORIGINAL label ids (the cohort's mapping is applied at training time). Writes::

    DIR/cohorts.json                          # the cohorts as declared, data = "<cohort>/dataset.json"
    DIR/<cohort>/dataset.json                 # name, reference, align, spacing, training list
    DIR/<cohort>/imagesTr/<case>.nii.gz
    DIR/<cohort>/labelsTr/<case>.nii.gz
    DIR/<cohort>/transforms/<case>.tfm        # ITK, reference (LPS mm) -> original scan

``scripts.cohorts.load_cohorts("DIR/cohorts.json")`` reads the result directly. A first pass
checks everything (cohort declarations, files, label ids against the mappings, 3-D images in
Hounsfield units, label grids, case names, the grid's size and memory) before anything is written;
the output folder is checked (absent or empty unless ``--overwrite``, writable) before anything is
read. The second pass writes case by case into a staging folder next to DIR, published as DIR when
complete (``scripts.files.staged_dir``; with ``--overwrite`` the old DIR is replaced only then), with
the umask's permissions. The input files are only read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from functools import partial

import itk
import numpy as np

from scripts import cohorts as cohort_lib
from scripts import ct_pair
from scripts.cohorts import CohortError, check_label_ids, cohort_cases, load_cohorts
from scripts.files import check_output_dir, staged_dir
from scripts.learn2reg import DatasetError

__all__ = ["ALIGN_KINDS", "case_name", "check_cohorts", "list_cases", "prepare_cohorts"]

ALIGN_KINDS = ("translation", "affine", "center", "none")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_CHEAP = ("none", "center")  # transforms known without registration: overlap checked in the first pass


def case_name(image: str) -> str:
    """The file name without .nii / .nii.gz, or the folder name of a DICOM series."""
    base = os.path.basename(os.path.normpath(image))
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def list_cases(cohort: dict) -> list[dict]:
    """``scripts.cohorts.cohort_cases``, plus DICOM series folders given as ``image`` in a list of
    ``{"image", "label"}`` entries (the folder must exist; its label map is a NIfTI file)."""
    data = cohort["data"]
    if not isinstance(data, (list, tuple)) or not any(isinstance(e, dict) and _is_dir(e.get("image")) for e in data):
        return cohort_cases(cohort)
    out = []
    for e in data:
        if isinstance(e, dict) and _is_dir(e.get("image")):
            case = {"image": os.path.abspath(e["image"])}
            if e.get("label"):  # checked as cohort_cases checks label files
                case["label"] = os.path.abspath(e["label"])
                if not os.path.isfile(case["label"]):
                    raise CohortError(f"cohort {cohort['name']!r}: label {case['label']} does not exist")
                cohort_lib._check_header(case["label"], f"cohort {cohort['name']!r}")
            out.append({**case, "cohort": cohort["name"], "lut": cohort["lut"], "mask": cohort["mask"]})
        else:
            out += cohort_cases({**cohort, "data": [e]})
    return out


def _is_dir(path) -> bool:
    return isinstance(path, str) and os.path.isdir(path)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _overlaps(grid, image, transform) -> bool:
    """Whether the grid, mapped by ``transform`` into ``image``'s space, meets the image's extent
    (bounding box in the image's index space: a conservative test, for the cheap alignments)."""
    points = np.array([transform.TransformPoint([float(x) for x in p]) for p in ct_pair._corners(grid)])
    step = ct_pair._matrix(image) @ np.diag(itk.spacing(image))
    index = (points - np.array(itk.origin(image), dtype=float)) @ np.linalg.inv(step).T
    size = np.array(itk.size(image), dtype=float)
    return bool(np.all(index.max(0) >= -0.5) and np.all(index.min(0) <= size - 0.5))


def _no_overlap(image: str, reference: str, align: str) -> DatasetError:
    return DatasetError(
        f"{image}: does not overlap the reference scan {reference} after alignment {align!r} (scanner coordinates "
        "of different patients rarely do): use --align translation, affine or center"
    )


def check_cohorts(cohorts, reference: str, align: str = "translation", spacing: float = 2.0, size=None):
    """First pass: every check, nothing written. Returns (reference image, grid, plan) where plan
    is a list of (cohort dict, [case dicts with ``name``])."""
    if align not in ALIGN_KINDS:
        raise ValueError(f"align must be one of {', '.join(ALIGN_KINDS)}, got {align!r}")
    ct_pair.check_grid_args(spacing, "RAS", size)
    normalised = load_cohorts(cohorts)
    plan = []
    for cohort in normalised:
        name = cohort["name"]
        if not _SAFE_NAME.match(name) or name == "cohorts.json":
            raise CohortError(
                f"cohort {name!r}: the name is used as a folder name; use letters, digits and _ . + - "
                "(not starting with a dot)"
            )
        cases = list_cases(cohort)
        seen: dict[str, str] = {}
        for c in cases:
            c["name"] = case_name(c["image"])
            if c["name"] in seen:
                raise CohortError(
                    f"cohort {name!r}: {seen[c['name']]} and {c['image']} both give the case name {c['name']!r}; "
                    "rename one of them"
                )
            seen[c["name"]] = c["image"]
        check_label_ids(cohort, cases)
        plan.append((cohort, cases))
    ref = ct_pair.read_image(reference)
    grid = ct_pair.common_grid(ref, spacing, "RAS", 16, size, name=reference)
    for cohort, cases in plan:
        start = time.time()
        for c in cases:
            image = ct_pair.read_image(c["image"])
            if "label" in c:
                ct_pair.read_label(c["label"], image, c["image"])
            if align in _CHEAP and not _overlaps(grid, image, ct_pair.prealign_transform(ref, image, align)):
                raise _no_overlap(c["image"], reference, align)
            del image
        print(f"checked cohort {cohort['name']}: {len(cases)} cases ({time.time() - start:.1f} s)", flush=True)
    return ref, grid, plan


def _check_inputs_outside(out_dir: str, inputs: list[str], overwrite: bool) -> None:
    if overwrite and os.path.isdir(out_dir):  # the folder's whole content is replaced
        for path in inputs:
            if _inside(path, out_dir):
                raise ValueError(f"--overwrite would delete the input {path}, which lies inside {out_dir}")


def _hu_int16(image):
    """Linear interpolation gives fractional HU: rounded to int16 (half the disk of float32)."""
    arr = np.clip(np.rint(itk.array_view_from_image(image)), -32768, 32767).astype(np.int16)
    out = itk.image_from_array(arr)
    out.CopyInformation(image)
    return out


def prepare_cohorts(
    cohorts,
    reference: str,
    out_dir: str,
    align: str = "translation",
    spacing: float = 2.0,
    size=None,
    overwrite: bool = False,
) -> dict:
    """Checks everything, then writes the prepared cohorts (see the module doc). ``cohorts``: a
    JSON file or a list of cohort dicts. Returns a summary: ``grid_size``, per cohort its
    ``cases`` and the ``missing_ids`` (declared label ids found in no prepared label map: cropped
    by the grid), and the ``seconds`` per case."""
    check_output_dir(out_dir, overwrite, overwrite_option="--overwrite")
    raw = cohorts
    if isinstance(cohorts, str):
        load_cohorts(cohorts)  # its message for an unreadable file
        with open(cohorts) as f:
            raw = json.load(f)
    ref, grid, plan = check_cohorts(cohorts, reference, align, spacing, size)
    inputs = [reference] + ([cohorts] if isinstance(cohorts, str) else [])
    inputs += [c[k] for _, cases in plan for c in cases for k in ("image", "label") if k in c]
    _check_inputs_outside(out_dir, inputs, overwrite)

    total = sum(len(cases) for _, cases in plan)
    summary = {"grid_size": [int(x) for x in itk.size(grid)], "cohorts": {}, "seconds": []}
    done = 0
    with staged_dir(out_dir, overwrite, overwrite_option="--overwrite") as tmp:

        def write(rel: str, writer) -> None:  # a failure names out_dir/rel, not the staging folder
            ct_pair.write_output(tmp, out_dir, rel, writer)

        for cohort, cases in plan:
            name = cohort["name"]
            entries, found = [], set()
            for c in cases:
                start = time.time()
                image = ct_pair.read_image(c["image"])
                label = ct_pair.read_label(c["label"], image, c["image"]) if "label" in c else None
                transform = ct_pair.prealign_transform(ref, image, align)
                moved = ct_pair._resample(image, grid, transform, nearest=False, default=ct_pair.AIR_HU)
                values = itk.array_view_from_image(moved)
                if float(values.max()) == float(values.min()):
                    raise _no_overlap(c["image"], reference, align)
                entry = {"image": f"imagesTr/{c['name']}.nii.gz"}
                write(f"{name}/{entry['image']}", partial(ct_pair.write_image, _hu_int16(moved)))
                if label is not None:
                    moved_label = ct_pair._resample(label, grid, transform, nearest=True, default=0)
                    found |= {int(v) for v in np.unique(itk.array_view_from_image(moved_label))} - {0}
                    entry["label"] = f"labelsTr/{c['name']}.nii.gz"
                    write(f"{name}/{entry['label']}", partial(ct_pair.write_image, moved_label))
                entry["transform"] = f"transforms/{c['name']}.tfm"
                write(f"{name}/{entry['transform']}", partial(ct_pair.write_transform, transform))
                entry["source_image"] = c["image"]
                if label is not None:
                    entry["source_label"] = c["label"]
                entries.append(entry)
                del image, label, moved
                done += 1
                seconds = time.time() - start
                summary["seconds"].append(seconds)
                print(f"[{done}/{total}] {name} {c['name']}: {seconds:.1f} s", flush=True)
            index = {
                "name": name, "reference": os.path.abspath(reference), "align": align, "spacing": float(spacing),
                "orientation": "RAS", "grid_size": summary["grid_size"], "training": entries,
            }  # fmt: skip
            write(f"{name}/dataset.json", partial(ct_pair.write_json, index))
            missing = sorted(set(cohort["labels"]) - found)
            if missing and any("label" in c for c in cases):
                print(
                    f"warning: cohort {name!r}: label ids {missing} lie outside the prepared grid in every case "
                    "(scripts.cohorts.check_label_ids will refuse them: a larger --size keeps them)",
                    file=sys.stderr,
                )
            summary["cohorts"][name] = {"cases": len(cases), "missing_ids": missing}
        declared = [
            {"name": str(spec["name"]), "data": f"{cohort['name']}/dataset.json",
             **{k: spec[k] for k in ("labels", "annotated") if k in spec}}
            for (cohort, _), spec in zip(plan, raw, strict=True)
        ]  # fmt: skip
        write("cohorts.json", partial(ct_pair.write_json, declared))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", required=True, help="JSON list of cohorts (see scripts/cohorts.py)")
    parser.add_argument("--reference", required=True, help="the reference scan: NIfTI file or DICOM series folder")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--align", default="translation", choices=ALIGN_KINDS,
                        help="transform of each scan onto the reference (default translation, as the authors' code)")  # fmt: skip
    parser.add_argument("--spacing", type=float, default=2.0, help="mm, isotropic (default 2)")
    parser.add_argument(
        "--size", type=int, nargs=3, help="grid size in voxels, multiples of 16 (default: the reference's extent)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out_dir once the new one is complete"
    )
    args = parser.parse_args(argv)
    start = time.time()
    try:
        summary = prepare_cohorts(
            args.cohorts, args.reference, args.out_dir, args.align, args.spacing, args.size, args.overwrite
        )
    except (ValueError, OSError) as e:  # DatasetError, CohortError; FileExistsError, PermissionError, a failed write
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(summary["seconds"])
    print(
        f"wrote {args.out_dir}: {n} cases of {len(summary['cohorts'])} cohorts on a {summary['grid_size']} grid at "
        f"{args.spacing} mm ({time.time() - start:.0f} s, {np.mean(summary['seconds']):.1f} s per case)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
