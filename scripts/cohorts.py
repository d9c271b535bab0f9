"""Partially-labelled cohorts (docs/ct.md, "Pretraining and noisy labels"): which organs each collection of scans
annotates, and how its label ids map onto the 11 organs of the segmentation network.

A cohort is a dict (in a config, or a JSON file holding a list of them)::

    {"name": "msd_pancreas",
     "data": "/data/Task07_Pancreas",            # see below
     "labels": {"1": "pancreas", "2": "pancreas"},  # file label id -> organ; null drops the id
     "annotated": ["pancreas"]}                   # optional: default = the organs named in labels

``data`` is a folder with an MSD ``dataset.json`` or a Learn2Reg ``<Task>_dataset.json`` (its
``training`` list), the path of such a JSON file, a folder of NIfTI images (``*.nii.gz``, images
only), or an explicit list of ``{"image": path, "label": path}`` dicts (paths relative to the
current directory).

Organ ids of the segmentation network: 0 background, then ``ORGANS`` in order (1 spleen ...
11 oesophagus). ``"kidney_by_side"`` maps a label id holding both kidneys (KiTS) to the right and
left kidney by the side of the body midline each voxel lies on. The Dice loss of a sample counts
only its cohort's ``annotated`` organs (``scripts.losses.PartialLabelDiceLoss``).

Examples (docs/README.md lists them as a JSON file): MSD spleen ``{"1": "spleen"}``; MSD pancreas
``{"1": "pancreas", "2": "pancreas"}`` (tumour is part of the organ); KiTS19
``{"1": "kidney_by_side", "2": null}`` (tumour dropped); Learn2Reg AbdomenCTCT / BTCV: its 13 ids,
adrenal glands dropped (``scripts.cohorts.ABDOMENCTCT_LABELS``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.files import atomic_path, check_output_dir, publish_dir, staging_path
from scripts.learn2reg import DatasetError, nifti_header, read_index, read_index_file, training_cases

__all__ = [
    "ABDOMENCTCT_LABELS",
    "KIDNEY_BY_SIDE",
    "NUM_CLASSES",
    "ORGANS",
    "CohortError",
    "KeepGroundTruthd",
    "MapCohortLabelsd",
    "check_label_ids",
    "cohort_cases",
    "load_cohorts",
    "output_root",
    "pseudo_label_path",
    "registration_cases",
    "run_staged",
    "segmentation_cases",
    "split_kidneys_by_side",
    "staging_dir",
    "write_pseudo_label_index",
]  # fmt: skip

ORGANS = (
    "spleen", "right_kidney", "left_kidney", "liver", "stomach", "pancreas", "gallbladder", "aorta", "ivc",
    "portal_vein", "oesophagus",
)  # fmt: skip
NUM_CLASSES = len(ORGANS) + 1
KIDNEY_BY_SIDE = "kidney_by_side"
_SPLIT = -1  # look-up table code for kidney_by_side
BODY_HU = -500.0  # voxels above this are the body, for the midline of kidney_by_side

# Learn2Reg AbdomenCTCT / BTCV ids; 12 and 13 (adrenal glands) are not among the 11 organs.
ABDOMENCTCT_LABELS = {
    "1": "spleen", "2": "right_kidney", "3": "left_kidney", "4": "gallbladder", "5": "oesophagus", "6": "liver",
    "7": "stomach", "8": "aorta", "9": "ivc", "10": "portal_vein", "11": "pancreas", "12": None, "13": None,
}  # fmt: skip


class CohortError(ValueError):
    """A cohort declaration or its data that cannot be used; the message names the cohort and file."""


def load_cohorts(cohorts) -> list[dict]:
    """Checks cohort declarations and returns them normalised: ``name``, ``data``, ``labels``
    ({int id: organ name | None | "kidney_by_side"}), ``annotated`` (organ names), ``lut`` (int16
    look-up table: file id -> organ id) and ``mask`` (float32 (NUM_CLASSES,), 1 for annotated organs).

    ``cohorts``: a list of dicts, or the path of a JSON file holding that list (relative ``data``
    paths in a file are relative to the file).
    """
    where = "cohorts"
    base = None
    if isinstance(cohorts, str) and not cohorts:
        raise CohortError(
            "no cohorts given: pass --cohorts FILE.json (a list of cohorts, see docs/cohorts_example.json)"
        )
    if isinstance(cohorts, str):
        where = base = cohorts
        try:
            with open(cohorts) as f:
                cohorts = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CohortError(f"{where}: not a readable JSON list of cohorts ({e})") from e
        base = os.path.dirname(os.path.abspath(base))
    if not isinstance(cohorts, (list, tuple)) or not cohorts:
        raise CohortError(f"{where}: expected a non-empty list of cohorts, got {type(cohorts).__name__}")
    out, names = [], set()
    for i, spec in enumerate(cohorts):
        if not isinstance(spec, dict) or not spec.get("name") or "data" not in spec:
            raise CohortError(f"{where}: cohort {i} needs a 'name' and 'data', got {spec!r}")
        name = str(spec["name"])
        if name in names:
            raise CohortError(f"{where}: two cohorts are named {name!r}")
        names.add(name)
        unknown_keys = set(spec) - {"name", "data", "labels", "annotated"}
        if unknown_keys:
            raise CohortError(f"{where}: cohort {name!r} has unknown keys {sorted(unknown_keys)}")
        labels = _parse_labels(spec.get("labels") or {}, f"{where}: cohort {name!r}")
        mapped = {o for o in labels.values() if o}
        mapped = (mapped - {KIDNEY_BY_SIDE}) | ({"right_kidney", "left_kidney"} if KIDNEY_BY_SIDE in mapped else set())
        annotated = spec.get("annotated")
        if annotated is None:
            annotated = sorted(mapped, key=ORGANS.index)
        else:
            if not isinstance(annotated, (list, tuple)):
                raise CohortError(f"{where}: cohort {name!r}: 'annotated' must be a list of organ names")
            bad = [o for o in annotated if o not in ORGANS]
            if bad:
                raise CohortError(
                    f"{where}: cohort {name!r}: unknown organs {bad} in 'annotated'; known organs: {list(ORGANS)}"
                )
            unlabelled = [o for o in annotated if o not in mapped]
            if unlabelled:
                raise CohortError(
                    f"{where}: cohort {name!r} declares {unlabelled} annotated but no label id maps to them: "
                    "the loss would teach the network that these organs are absent"
                )
        data = spec["data"]
        if isinstance(data, str) and base is not None and not os.path.isabs(data):
            data = os.path.normpath(os.path.join(base, data))
        lut = np.zeros(max(labels, default=0) + 1, dtype=np.int16)
        for k, organ in labels.items():
            lut[k] = _SPLIT if organ == KIDNEY_BY_SIDE else (ORGANS.index(organ) + 1 if organ else 0)
        mask = np.zeros(NUM_CLASSES, dtype=np.float32)
        mask[[ORGANS.index(o) + 1 for o in annotated]] = 1.0
        out.append(
            {"name": name, "data": data, "labels": labels, "annotated": list(annotated), "lut": lut, "mask": mask}
        )
    return out


def _parse_labels(labels, where: str) -> dict[int, str | None]:
    if not isinstance(labels, dict):
        raise CohortError(f"{where}: 'labels' must map label ids to organ names, got {labels!r}")
    out = {}
    for key, organ in labels.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise CohortError(f"{where}: label id {key!r} is not an integer") from None
        if k < 1:
            raise CohortError(f"{where}: label id {k}: ids start at 1 (0 is background)")
        if organ is not None and organ != KIDNEY_BY_SIDE and organ not in ORGANS:
            raise CohortError(
                f"{where}: label {k} maps to unknown organ {organ!r}; known organs: {list(ORGANS)}, "
                f"{KIDNEY_BY_SIDE!r}, or null to drop the id"
            )
        out[k] = organ
    return out


def _files(data, where: str, exclude_val: bool, num_val: int) -> list[dict]:
    """Image (+ label) paths of a cohort's ``data``."""
    if isinstance(data, (list, tuple)):
        entries = []
        for i, e in enumerate(data):
            if not isinstance(e, dict) or not e.get("image"):
                raise CohortError(f"{where}: data entry {i} needs an 'image', got {e!r}")
            entries.append({k: os.path.abspath(e[k]) for k in ("image", "label") if e.get(k)})
    elif isinstance(data, str) and os.path.isfile(data) and data.endswith((".nii", ".nii.gz")):
        entries = [{"image": os.path.abspath(data)}]
    elif isinstance(data, str) and os.path.isfile(data) and data.endswith(".json"):
        folder = os.path.dirname(os.path.abspath(data))
        index = read_index_file(data, CohortError)
        if "registration_val" in index:  # a Learn2Reg index: read it as its folder
            return _files(folder, where, exclude_val, num_val)
        entries = [
            {
                k: os.path.normpath(os.path.join(folder, e[k]))
                for k in ("image", "label")
                if isinstance(e, dict) and e.get(k)
            }
            for e in index["training"]
        ]
    elif isinstance(data, str) and os.path.isdir(data):
        try:
            _, index = read_index(data)
        except DatasetError:
            index = None
        if index is not None:
            # The validation cases of a Learn2Reg folder are never used (its validation must stay
            # held out from pretraining and from the labels that supervise it); an MSD folder's
            # last num_val cases only when pairs are drawn for registration pretraining.
            exclude = exclude_val or "registration_val" in index
            try:
                return [{k: c[k] for k in ("image", "label") if k in c} for c in training_cases(data, num_val, exclude)]
            except DatasetError as e:
                raise CohortError(f"{where}: {e}") from e
        entries = [{"image": p} for p in sorted(glob.glob(os.path.join(data, "*.nii*")))]
    else:
        raise CohortError(
            f"{where}: data {data!r} is not a folder, a dataset JSON file or a list of {{'image', 'label'}}"
        )
    if not entries:
        raise CohortError(f"{where}: no images in {data!r}")
    for e in entries:
        for k, path in e.items():
            if not os.path.isfile(path):
                raise CohortError(f"{where}: {k} {path} does not exist")
    return entries


def cohort_cases(cohort: dict, exclude_val: bool = False, num_val: int = 40) -> list[dict]:
    """The cases of one normalised cohort: ``image``, ``label`` if any, ``cohort`` (name), ``lut``
    and ``mask`` (see ``load_cohorts``)."""
    where = f"cohort {cohort['name']!r}"
    cases = _files(cohort["data"], where, exclude_val, num_val)
    for c in cases:
        for key in ("image", "label"):
            if key in c:
                _check_header(c[key], where)
    return [{**c, "cohort": cohort["name"], "lut": cohort["lut"], "mask": cohort["mask"]} for c in cases]


def _check_header(path: str, where: str) -> None:
    nifti_header(path, CohortError, where)


def check_label_ids(cohort: dict, cases: list[dict]) -> None:
    """Reads every label map of the cohort and refuses (naming the file) an id its mapping does not
    declare, and (naming the cohort) declared ids that occur in none of its files (a mapping
    written for another dataset)."""
    seen: set[int] = set()
    declared = set(cohort["labels"])
    for c in cases:
        if "label" not in c:
            continue
        try:
            values = np.unique(np.asarray(nib.load(c["label"]).dataobj))
        except Exception as e:  # nibabel raises several types for unreadable files
            raise CohortError(f"{c['label']}: not a readable label map ({e})") from e
        if not np.all(values == np.round(values)) or values.min() < 0:
            raise CohortError(f"{c['label']}: label values must be non-negative integers, got {values[:10]}")
        ids = {int(v) for v in values} - {0}
        extra = sorted(ids - declared)
        if extra:
            raise CohortError(
                f"{c['label']}: label ids {extra} are not in the mapping of cohort {cohort['name']!r} "
                f"(declared: {sorted(declared)}); map them to an organ, or to null to drop them"
            )
        seen |= ids
    labelled = [c for c in cases if "label" in c]
    if declared and not labelled:
        raise CohortError(
            f"cohort {cohort['name']!r} maps label ids {sorted(declared)} but none of its cases has a label map"
        )
    absent = sorted(declared - seen)
    if absent:
        raise CohortError(
            f"cohort {cohort['name']!r}: label ids {absent} of its mapping occur in none of its {len(labelled)} label "
            f"maps (e.g. {labelled[0]['label']}); is the mapping for another dataset?"
        )


def segmentation_cases(
    cohorts, check_labels: bool = True, same_grid: bool = False, annotated_only: bool = False
) -> list[dict]:
    """All cases of all cohorts for the segmentation network; with ``check_labels`` every label map
    is read once to check it against its cohort's mapping (about 0.5 s per CT label map). With
    ``same_grid`` (inference, where ground-truth organs are copied into the pseudo-label on the
    scan's own grid) a label map must have its image's shape and affine (headers only; prepare
    the cohort with ``scripts.prepare_cohorts`` otherwise). With ``annotated_only`` (training),
    cohorts that annotate no organ (scans to pseudo-label only) are left out."""
    out = []
    for cohort in load_cohorts(cohorts):
        if annotated_only and not cohort["annotated"]:
            continue
        cases = cohort_cases(cohort)
        if same_grid:
            for c in cases:
                if "label" in c:
                    _check_same_grid(c["image"], c["label"])
        if check_labels:
            check_label_ids(cohort, cases)
        out += cases
    if not out:
        raise CohortError("no cohort annotates any organ: nothing to train the segmentation network on")
    return out


def _check_same_grid(image: str, label: str) -> None:
    a, b = nib.load(image), nib.load(label)
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise CohortError(
            f"{label}: label map grid (shape {b.shape}, orientation {''.join(nib.aff2axcodes(b.affine))}) "
            f"is not the grid of its image {image} (shape {a.shape}, orientation {''.join(nib.aff2axcodes(a.affine))}); "
            "resample it onto the image (python -m scripts.prepare_cohorts does)"
        )


def registration_cases(cohorts, use_labels: bool = False, num_val: int = 40) -> list[dict]:
    """Cases for registration pretraining, each tagged with its ``cohort`` so that pairs are drawn
    within a cohort. Learn2Reg / MSD folders hold out their validation cases. Without
    ``use_labels`` label maps are dropped (unsupervised: similarity + regulariser); with it they
    are used as they are (pseudo-labels written by seg_inference.json share the organ ids)."""
    out = []
    for cohort in load_cohorts(cohorts):
        cases = cohort_cases(cohort, exclude_val=True, num_val=num_val)
        if len(cases) < 2:
            raise CohortError(
                f"cohort {cohort['name']!r}: pairs are drawn within a cohort and it has {len(cases)} case"
            )
        for c in cases:
            case = {"image": c["image"], "cohort": c["cohort"]}
            if use_labels:
                if "label" not in c:
                    raise CohortError(f"cohort {cohort['name']!r}: {c['image']} has no label map (use_labels is on)")
                case["label"] = c["label"]
            out.append(case)
    return out


def split_kidneys_by_side(
    kidney: torch.Tensor, affine, body: torch.Tensor | None = None, body_affine=None
) -> torch.Tensor:
    """Organ ids for a mask holding both kidneys (bool, spatial shape): right kidney (2) on the
    patient's right of the midline, left kidney (3) on the left. RAS world x (``affine``, MONAI /
    nibabel convention) increases towards the patient's right; the midline is the mean x of
    ``body`` voxels (on the grid of ``body_affine``, default ``affine``; default body: the middle
    of the field of view)."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    body_affine = affine if body_affine is None else torch.as_tensor(body_affine, dtype=torch.float64)
    ijk = torch.nonzero(kidney).to(torch.float64)
    x = ijk @ affine[0, :3] + affine[0, 3]
    if body is not None and body.any():
        b = torch.nonzero(body).to(torch.float64)
        mid = (b @ body_affine[0, :3] + body_affine[0, 3]).mean()
    else:
        centre = (torch.tensor(kidney.shape, dtype=torch.float64) - 1) / 2
        mid = centre @ affine[0, :3] + affine[0, 3]
    out = torch.zeros(kidney.shape, dtype=torch.int16)
    right = ORGANS.index("right_kidney") + 1
    left = ORGANS.index("left_kidney") + 1
    idx = tuple(ijk.long().T)
    out[idx] = torch.where(x > mid, right, left).to(torch.int16)
    return out


class MapCohortLabelsd(MapTransform):
    """Maps a label map's file ids to organ ids with the case's cohort look-up table (``lut_key``),
    splitting ``kidney_by_side`` ids with ``image_key``'s body midline. Runs on the loaded label
    (1, H, W, D), before any resampling. An id above the largest declared id raises, naming the
    file; undeclared ids below it are refused earlier by ``check_label_ids`` (``check_labels``,
    on by default in the configs)."""

    def __init__(self, keys="label", image_key: str = "image", lut_key: str = "lut", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.lut_key = image_key, lut_key

    def __call__(self, data):
        d = dict(data)
        lut = torch.as_tensor(np.asarray(d[self.lut_key]), dtype=torch.int16)
        for key in self.key_iterator(d):
            label = d[key]
            values = torch.as_tensor(label).round().long()
            name = (getattr(label, "meta", None) or {}).get("filename_or_obj", key)
            if values.min() < 0 or values.max() >= len(lut):
                raise CohortError(
                    f"{name}: label ids {sorted(set(torch.unique(values).tolist()) - set(range(len(lut))))} are not in "
                    f"the mapping of cohort {d.get('cohort', '?')!r}"
                )
            mapped = lut[values]
            split = mapped == _SPLIT
            if split.any():
                body, body_affine = None, None
                if self.image_key in d:  # the image's own grid may store the axes in another order
                    body = torch.as_tensor(d[self.image_key])[0] > BODY_HU
                    body_affine = getattr(d[self.image_key], "affine", None)
                affine = getattr(label, "affine", None)
                if affine is None:
                    raise CohortError(f"{name}: kidney_by_side needs the label map's affine (load it with LoadImaged)")
                sides = split_kidneys_by_side(split[0], affine, body, body_affine)
                mapped = torch.where(split, sides[None], mapped)
            out = mapped.to(torch.float32)
            if isinstance(label, MetaTensor):
                out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
            d[key] = out
        return d


class KeepGroundTruthd(MapTransform):
    """Pseudo-labels that keep the ground truth (docs/ct.md, "Pretraining and noisy labels"): in ``keys`` (a predicted
    organ-id map, (1, H, W, D)), the organs the case's cohort annotates (``mask_key``) are taken
    from ``label_key`` (the case's label map, already mapped to organ ids, same grid) and nowhere
    else; every ground-truth organ voxel keeps its ground-truth id. Cases without a label map are
    left unchanged."""

    def __init__(self, keys="pred", label_key: str = "label", mask_key: str = "mask", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.mask_key = label_key, mask_key

    def __call__(self, data):
        d = dict(data)
        if self.label_key not in d or self.mask_key not in d:
            return d
        gt = torch.as_tensor(d[self.label_key]).round().long()
        annotated = torch.nonzero(torch.as_tensor(np.asarray(d[self.mask_key])) > 0).flatten()
        for key in self.key_iterator(d):
            pred = d[key]
            values = torch.as_tensor(pred).round().long()
            if values.shape != gt.shape:
                raise ValueError(f"prediction shape {tuple(values.shape)} and label map shape {tuple(gt.shape)} differ")
            out = torch.where(torch.isin(values, annotated.to(values.device)), torch.zeros_like(values), values)
            out = torch.where(gt > 0, gt.to(out.device), out).to(pred.dtype)
            d[key] = (
                MetaTensor(out, meta=pred.meta, applied_operations=pred.applied_operations)
                if isinstance(pred, MetaTensor)
                else out
            )
        return d


def output_root(cases: list[dict]) -> str:
    """The deepest folder holding every image of ``cases``: seg_inference.json writes each label map
    under ``output_dir`` at the image's path relative to it (``SaveImaged(data_root_dir=...)``), so
    images of the same name in different folders (KiTS ``case_00000/imaging.nii.gz``, ...) do not
    overwrite each other. An image listed twice is refused."""
    images = [os.path.abspath(c["image"]) for c in cases]
    if not images:
        raise CohortError("no images to segment")
    twice = sorted({p for p in images if images.count(p) > 1})
    if twice:
        raise CohortError(
            f"{twice[0]}: listed {images.count(twice[0])} times (in one or several cohorts); its label map would be written twice"
        )
    return os.path.commonpath([os.path.dirname(p) for p in images])


def pseudo_label_path(image: str, output_dir: str, root: str, postfix: str = "seg") -> str:
    """Where seg_inference.json writes the label map of ``image`` (see ``output_root``)."""
    stem = os.path.basename(image)
    stem = stem[: -len(".nii.gz")] if stem.endswith(".nii.gz") else os.path.splitext(stem)[0]
    rel = os.path.relpath(os.path.dirname(os.path.abspath(image)), root)
    return os.path.normpath(os.path.join(os.path.abspath(output_dir), rel, f"{stem}_{postfix}.nii.gz"))


def write_pseudo_label_index(
    cases: list[dict], output_dir: str, postfix: str = "seg", written_dir: str | None = None
) -> str:
    """After seg_inference.json: ``<output_dir>/dataset.json`` listing every image with its
    pseudo-label map (organ ids), and ``<output_dir>/cohorts.json``, the same cases grouped by
    their cohort: ``--cohorts <output_dir>/cohorts.json --use_labels True`` pretrains the
    registration network on them with pairs drawn within each cohort. Refuses (naming it) a case
    whose label map was not written. Returns the path of cohorts.json.

    ``written_dir``: where the maps and both files are written now, if not ``output_dir`` (a
    staging folder renamed to ``output_dir`` afterwards, see ``run_staged``); the files list the
    maps under ``output_dir``."""
    written_dir = written_dir or output_dir
    entries = []
    root = output_root(cases)
    for c in cases:
        label = pseudo_label_path(c["image"], output_dir, root, postfix)
        if not os.path.isfile(pseudo_label_path(c["image"], written_dir, root, postfix)):
            raise CohortError(f"{label}: the pseudo-label map of {c['image']} was not written")
        entries.append({"image": c["image"], "label": label, "cohort": c["cohort"]})
    organ_ids = {"0": "background", **{str(i + 1): o for i, o in enumerate(ORGANS)}}
    index = {
        "description": "pseudo-labels written by configs/seg_inference.json",
        "labels": organ_ids,
        "training": entries,
    }
    groups: dict[str, list] = {}
    for e in entries:
        groups.setdefault(e["cohort"], []).append({"image": e["image"], "label": e["label"]})
    listing = [{"name": name, "data": data} for name, data in groups.items()]
    for name, content in (("dataset.json", index), ("cohorts.json", listing)):
        with atomic_path(os.path.join(written_dir, name)) as tmp, open(tmp, "w") as f:
            json.dump(content, f, indent=1)
    return os.path.join(output_dir, "cohorts.json")


def staging_dir(output_dir: str) -> str:
    """The folder seg_inference.json writes into (``scripts.files.staging_path``: a temporary folder
    next to ``output_dir``), published to ``output_dir`` by ``run_staged`` once every case is done.
    Refuses (naming it) an ``output_dir`` that is a file or a non-empty folder, so nothing is
    overwritten; creates nothing, and removes the staging folders of killed runs."""
    try:
        check_output_dir(output_dir, overwrite=False, overwrite_option=None)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise CohortError(str(e)) from e
    return staging_path(output_dir)


def run_staged(evaluator, cases: list[dict], output_dir: str, staging: str, postfix: str = "seg") -> str:
    """Runs ``evaluator`` (whose writer saves into ``staging``), writes the index files, then moves
    ``staging`` to ``output_dir`` (``scripts.files.publish_dir``). On any failure ``staging`` is
    removed: no partial set of label maps is ever left under ``output_dir``. Returns the path of
    ``<output_dir>/cohorts.json``."""
    try:
        evaluator.run()
        index = write_pseudo_label_index(cases, output_dir, postfix, written_dir=staging)
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index
