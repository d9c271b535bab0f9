"""Registration of an arbitrary pair of CT scans (NIfTI or DICOM, any orientation and spacing).

Three steps; the middle one is the bundle's own inference with the CT overlay:

    # 1. read, check, resample both scans to 2 mm on one grid around the fixed scan (optionally
    #    after an ITK affine pre-alignment); writes a Learn2Reg-layout folder
    python -m scripts.ct_pair prepare --fixed FIXED --moving MOVING [--fixed_label L] [--moving_label L] \\
        --out_dir work/prepared [--prealign center|translation|affine]
    # 2. register it
    python -m monai.bundle run --config_file "['configs/inference.json','configs/abdomen_ct.json']" \\
        --dataset_dir work/prepared --output_dir work/registered --ckpt_path models/model_abdomen_ct.pt
    # 3. bring the result back to the FIXED scan's own grid (spacing, orientation, size)
    python -m scripts.ct_pair restore --prepared_dir work/prepared --disp_dir work/registered --out_dir work/result

``restore`` composes the pre-alignment and the predicted field into one ITK transform and resamples
the ORIGINAL moving scan once (linear) and its label map (nearest neighbour, values copied, never
interpolated) onto the fixed scan's grid. It writes ``warped_moving.nii.gz``,
``warped_moving_label.nii.gz``, ``displacement_mm.nii.gz`` (fixed grid, ITK convention: physical
LPS millimetres, fixed point + displacement = moving point; loads as a transform in 3D Slicer) and,
with both label maps, ``metrics.json`` (Dice per organ present in both scans, with and without the
deformable step).

A DICOM folder must hold one series. Every input is read and checked before anything is written,
and each output folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import itk
import nibabel as nib
import numpy as np

from scripts.learn2reg import DatasetError, disp_name

__all__ = ["read_image", "read_label", "common_grid", "prealign_transform", "prepare", "restore"]

TASK = "CTPair"
FIXED_ID, MOVING_ID = "0001", "0002"
AIR_HU = -1024.0
# direction of increasing array index for each orientation letter, in ITK's LPS physical frame
_AXIS = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "I": (0, 0, -1), "S": (0, 0, 1)}

PREALIGN_KINDS = ("none", "center", "translation", "affine")

Image = itk.Image[itk.F, 3]
LabelImage = itk.Image[itk.SS, 3]


# --------------------------------------------------------------------------- reading and checks
def _matrix(image) -> np.ndarray:
    return np.array(itk.array_from_matrix(image.GetDirection()), dtype=float)


def _dicom_files(folder: str) -> list[str]:
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(folder)
    uids = [u for u in names.GetSeriesUIDs()]
    if not uids:
        raise DatasetError(f"{folder}: no DICOM series found in this folder")
    if len(uids) > 1:
        raise DatasetError(
            f"{folder}: holds {len(uids)} DICOM series ({', '.join(u[:40] for u in uids)}); "
            "give a folder with exactly one series"
        )
    return list(names.GetFileNames(uids[0]))


def _check_dimension(path: str) -> None:
    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise DatasetError(f"{path}: not an image file ITK can read")
    io.SetFileName(path)
    try:
        io.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot read the image header: {str(e).strip().splitlines()[-1]}") from e
    dims = [io.GetDimensions(i) for i in range(io.GetNumberOfDimensions())]
    if len(dims) != 3 or io.GetNumberOfComponents() != 1:
        kind = f"{len(dims)}-D" if len(dims) != 3 else f"{io.GetNumberOfComponents()}-component"
        raise DatasetError(f"{path}: expected a 3-D single-channel image, got a {kind} image of size {dims}")


def read_image(path: str, check_hu: bool = True):
    """A CT scan as an ITK float image: a NIfTI (or any ITK format) file, or a folder with one DICOM
    series (rescale slope/intercept applied by GDCM). Refuses 2-D/4-D images and, with
    ``check_hu``, values that are not Hounsfield units."""
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            files = _dicom_files(path)
            if len(files) < 2:
                raise DatasetError(f"{path}: the DICOM series has {len(files)} slice; a 3-D scan is needed")
            reader = itk.ImageSeriesReader[Image].New(FileNames=files, ImageIO=itk.GDCMImageIO.New())
            reader.Update()
            image = reader.GetOutput()
        else:
            _check_dimension(path)
            image = itk.imread(path, itk.F)
    except DatasetError:
        raise
    except Exception as e:  # ITK's messages are long C++ traces; keep the last line
        raise DatasetError(f"{path}: cannot read the image: {str(e).strip().splitlines()[-1]}") from e
    values = itk.array_view_from_image(image)
    if not np.isfinite(values).all():
        raise DatasetError(f"{path}: image has NaN or infinite voxels")
    if check_hu and values.min() > -500:
        raise DatasetError(
            f"{path}: values {values.min():g}..{values.max():g} do not look like Hounsfield units (no voxel below "
            "-500; air is about -1000 HU): apply the rescale slope/intercept first"
        )
    return image


def _corners(image) -> np.ndarray:
    size = np.array(itk.size(image), dtype=float)
    idx = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float) * (size - 1)
    spacing, origin = np.array(itk.spacing(image), dtype=float), np.array(itk.origin(image), dtype=float)
    return origin + (idx * spacing) @ _matrix(image).T


def read_label(path: str, image, image_path: str = "the image"):
    """A label map on ``image``'s voxel grid. The file may store the same grid in another
    orientation (axes flipped or permuted): it is resampled with nearest neighbour, which copies
    values. A label map covering another region or with another voxel size is refused."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such label file")
    _check_dimension(path)
    try:
        label = itk.imread(path, itk.SS)
    except Exception as e:
        raise DatasetError(f"{path}: cannot read the label map: {str(e).strip().splitlines()[-1]}") from e
    values = itk.array_view_from_image(label)
    if values.min() < 0:
        raise DatasetError(f"{path}: negative label values")
    # Same physical voxel centres, whatever the storage order: same set of corners and voxel size.
    a, b = _corners(image), _corners(label)
    match = all(np.abs(b - c).sum(1).min() < 0.5 * min(itk.spacing(image)) for c in a)
    vox_a = sorted(np.abs(_matrix(image) @ np.diag(itk.spacing(image))).sum(1))
    vox_b = sorted(np.abs(_matrix(label) @ np.diag(itk.spacing(label))).sum(1))
    if not match or not np.allclose(vox_a, vox_b, atol=1e-3):
        raise DatasetError(
            f"{path}: the label map's grid (size {tuple(itk.size(label))}, spacing {tuple(np.round(itk.spacing(label), 3))}, "
            f"origin {tuple(np.round(itk.origin(label), 1))}) is not the grid of {image_path} (size {tuple(itk.size(image))}, "
            f"spacing {tuple(np.round(itk.spacing(image), 3))}, origin {tuple(np.round(itk.origin(image), 1))})"
        )
    return _resample(label, image, itk.IdentityTransform[itk.D, 3].New(), nearest=True, default=0)


# --------------------------------------------------------------------------- grids and transforms
def common_grid(fixed, spacing: float = 2.0, orientation: str = "RAS", multiple: int = 16, size=None):
    """An empty reference image: ``spacing`` mm isotropic, array axes along ``orientation``
    (NIfTI axis codes, e.g. RAS), covering the fixed scan's extent (or exactly ``size`` voxels),
    centred on it, each size a multiple of ``multiple`` (the network halves the grid 4 times)."""
    code = orientation.upper()
    if len(code) != 3 or any(c not in _AXIS for c in code):
        raise ValueError(f"orientation must be 3 axis codes like RAS or LPS, got {orientation!r}")
    direction = np.array([_AXIS[c] for c in code], dtype=float).T  # columns: index axes in LPS
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-6:
        raise ValueError(f"orientation {orientation!r} does not name three different axes")
    corners = _corners(fixed) @ direction  # in the new axes
    low, high = corners.min(0), corners.max(0)
    if size is None:
        n = np.ceil((high - low) / spacing).astype(int) + 1
        n = ((n + multiple - 1) // multiple) * multiple
    else:
        n = np.array([int(s) for s in size])
        if len(n) != 3 or any(n % multiple):
            raise ValueError(f"grid size must be 3 multiples of {multiple}, got {list(size)}")
    centre = (low + high) / 2
    origin = direction @ (centre - spacing * (n - 1) / 2)
    ref = Image.New()
    ref.SetRegions([int(x) for x in n])
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetOrigin([float(x) for x in origin])
    ref.SetDirection(itk.matrix_from_array(direction))
    return ref


def _resample(image, reference, transform, nearest: bool, default: float):
    interpolator = (itk.NearestNeighborInterpolateImageFunction if nearest else itk.LinearInterpolateImageFunction).New(image)
    return itk.resample_image_filter(
        image, transform=transform, interpolator=interpolator, use_reference_image=True,
        reference_image=reference, default_pixel_value=default,
    )  # fmt: skip


def prealign_transform(fixed, moving, kind: str = "affine", init: str | None = None):
    """ITK affine transform mapping fixed physical points to moving physical points.

    ``none``: identity (scanner coordinates), or the transform in the file ``init`` (an ITK
    ``.tfm``/``.txt``/``.h5`` affine, fixed -> moving, e.g. saved from a manual alignment in 3D
    Slicer); ``center``: translation of the image centres; ``affine``: from ``init`` or the
    centres, a Mattes mutual information affine registration (3 resolutions) of the scans clipped
    to [-200, 400] HU; ``translation``: the same registration optimising a translation only (the
    matrix of ``init``, or the identity, is kept; the returned transform is still an
    ``AffineTransform``). Scans of very different coverage (a 4 cm slab against an
    abdomen-pelvis scan) are not centred on the same anatomy: give ``init`` for them.
    """
    if kind not in PREALIGN_KINDS:
        raise ValueError(f"prealign must be one of {', '.join(PREALIGN_KINDS)}, got {kind!r}")
    transform = itk.AffineTransform[itk.D, 3].New()
    if init is not None:
        try:
            loaded = itk.transformread(init)[0]
            transform.SetFixedParameters(loaded.GetFixedParameters())
            transform.SetParameters(loaded.GetParameters())
        except Exception as e:
            raise DatasetError(f"{init}: not an ITK affine transform file: {str(e).strip().splitlines()[-1]}") from e
    if kind == "none" or (kind == "center" and init is not None):
        return transform
    clip = lambda im: itk.clamp_image_filter(im, bounds=(-200.0, 400.0))  # soft tissue
    f, m = clip(fixed), clip(moving)
    if init is None:
        centre_f, centre_m = _corners(fixed).mean(0), _corners(moving).mean(0)
        transform.SetCenter([float(c) for c in centre_f])
        transform.SetTranslation([float(t) for t in centre_m - centre_f])
    if kind == "center":
        return transform
    # translation: a translation t (fixed frame) is optimised after the start transform, which stays
    # fixed: x -> start(x + t); folded back into the affine below
    optimised = itk.TranslationTransform[itk.D, 3].New() if kind == "translation" else transform
    metric = itk.MattesMutualInformationImageToImageMetricv4[Image, Image].New(NumberOfHistogramBins=32)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=1.0, MinimumStepLength=1e-3, NumberOfIterations=200, RelaxationFactor=0.5
    )
    scales = itk.RegistrationParameterScalesFromPhysicalShift[itk.MattesMutualInformationImageToImageMetricv4[Image, Image]].New(
        Metric=metric
    )
    optimizer.SetScalesEstimator(scales)
    reg = itk.ImageRegistrationMethodv4[Image, Image].New(
        FixedImage=f, MovingImage=m, Metric=metric, Optimizer=optimizer, InitialTransform=optimised
    )
    if kind == "translation":
        reg.SetMovingInitialTransform(transform)
    reg.SetNumberOfLevels(3)
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    reg.SetMetricSamplingPercentage(0.2)
    reg.MetricSamplingReinitializeSeed(0)
    reg.InPlaceOn()
    reg.Update()
    if kind == "affine":
        return reg.GetModifiableTransform()
    # start(x + t) = A (x + t - c) + c + T = A (x - c) + c + (T + A t)
    shift = np.array(itk.array_from_matrix(transform.GetMatrix()), dtype=float) @ np.array(optimised.GetOffset(), dtype=float)
    transform.SetTranslation([float(a + b) for a, b in zip(transform.GetTranslation(), shift)])
    return transform


# --------------------------------------------------------------------------- output helpers
class _staged_dir:
    """Writes into a temporary folder next to ``path``, renamed to ``path`` on success and removed on
    failure. ``path`` must not exist yet or be an empty folder."""

    def __init__(self, path: str) -> None:
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise FileExistsError(f"output folder {path} already exists and is not empty")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self.path, self.tmp = path, tempfile.mkdtemp(prefix=".tmp-", dir=parent)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if os.path.isdir(self.path):
                os.rmdir(self.path)
            os.replace(self.tmp, self.path)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _write(image, path: str) -> None:
    itk.imwrite(image, path, compression=True)


# --------------------------------------------------------------------------- prepare / restore
def prepare(
    fixed: str,
    moving: str,
    out_dir: str,
    fixed_label: str | None = None,
    moving_label: str | None = None,
    prealign: str = "none",
    init_transform: str | None = None,
    spacing: float = 2.0,
    orientation: str = "RAS",
    size=None,
) -> dict:
    """Reads and checks both scans (and label maps), resamples them onto one grid around the fixed
    scan, and writes a Learn2Reg-layout folder ``out_dir`` (``CTPair_dataset.json``, ``imagesTr``,
    ``labelsTr``, the pre-alignment ``prealign.tfm`` and ``ct_pair.json`` for ``restore``)."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"output folder {out_dir} already exists and is not empty")
    f_img, m_img = read_image(fixed), read_image(moving)
    f_lab = read_label(fixed_label, f_img, fixed) if fixed_label else None
    m_lab = read_label(moving_label, m_img, moving) if moving_label else None
    grid = common_grid(f_img, spacing, orientation, size=size)
    transform = prealign_transform(f_img, m_img, prealign, init_transform)
    identity = itk.IdentityTransform[itk.D, 3].New()

    images = {
        FIXED_ID: _resample(f_img, grid, identity, nearest=False, default=AIR_HU),
        MOVING_ID: _resample(m_img, grid, transform, nearest=False, default=AIR_HU),
    }
    moved = itk.array_view_from_image(images[MOVING_ID])
    if float(moved.max()) == float(moved.min()):
        raise DatasetError(
            f"{moving}: does not overlap the fixed scan {fixed} after pre-alignment '{prealign}' (scanner "
            "coordinates of different patients rarely do): use --prealign center or affine, or --init_transform"
        )
    labels = {}
    if f_lab is not None and m_lab is not None:  # the dataset lists labels only for both
        labels = {FIXED_ID: _resample(f_lab, grid, identity, True, 0), MOVING_ID: _resample(m_lab, grid, transform, True, 0)}

    name = lambda i: f"{TASK}_{i}_0000.nii.gz"
    record = {
        "fixed": os.path.abspath(fixed), "moving": os.path.abspath(moving),
        "fixed_label": os.path.abspath(fixed_label) if fixed_label else None,
        "moving_label": os.path.abspath(moving_label) if moving_label else None,
        "prealign": prealign, "spacing": spacing, "orientation": orientation.upper(),
        "grid_size": [int(x) for x in itk.size(grid)], "fixed_id": FIXED_ID, "moving_id": MOVING_ID,
    }  # fmt: skip
    index = {
        "name": TASK,
        "tensorImageShape": {"0": record["grid_size"]},
        "training": [
            {"image": f"./imagesTr/{name(i)}", **({"label": f"./labelsTr/{name(i)}"} if labels else {})}
            for i in (FIXED_ID, MOVING_ID)
        ],
        "registration_val": [{"fixed": f"./imagesTr/{name(FIXED_ID)}", "moving": f"./imagesTr/{name(MOVING_ID)}"}],
        "numRegistration_val": 1,
    }
    with _staged_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        for i, im in images.items():
            _write(im, os.path.join(tmp, "imagesTr", name(i)))
        if labels:
            os.makedirs(os.path.join(tmp, "labelsTr"))
            for i, lab in labels.items():
                _write(lab, os.path.join(tmp, "labelsTr", name(i)))
        itk.transformwrite([transform], os.path.join(tmp, "prealign.tfm"))
        with open(os.path.join(tmp, f"{TASK}_dataset.json"), "w") as fh:
            json.dump(index, fh, indent=2)
        with open(os.path.join(tmp, "ct_pair.json"), "w") as fh:
            json.dump(record, fh, indent=2)
    return record


def _field_transform(disp_path: str, grid):
    """The Learn2Reg displacement file (voxels along the array axes of the prepared grid) as an ITK
    displacement field transform in physical LPS millimetres."""
    ddf = np.asarray(nib.load(disp_path).dataobj, dtype=np.float64)
    expected = (*itk.size(grid), 3)
    if ddf.shape != tuple(expected):
        raise DatasetError(f"{disp_path}: displacement field of shape {ddf.shape}, expected {tuple(expected)}")
    step = _matrix(grid) @ np.diag(itk.spacing(grid))  # column c: physical step of array axis c
    mm = ddf @ step.T  # (X, Y, Z, 3) physical displacement
    field = itk.image_from_array(np.ascontiguousarray(mm.transpose(2, 1, 0, 3)), is_vector=True)
    field.CopyInformation(grid)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    return transform


def _dice(a: np.ndarray, b: np.ndarray) -> dict:
    out = {}
    for k in sorted(set(np.unique(a).tolist()) & set(np.unique(b).tolist()) - {0}):
        x, y = a == k, b == k
        out[str(int(k))] = float(2 * (x & y).sum() / (x.sum() + y.sum()))
    return out


def restore(prepared_dir: str, disp_dir: str, out_dir: str) -> dict:
    """Maps the registration of a prepared pair back to the fixed scan's own grid (see module doc)."""
    record_path = os.path.join(prepared_dir, "ct_pair.json")
    if not os.path.isfile(record_path):
        raise DatasetError(f"{prepared_dir}: no ct_pair.json; this folder was not written by 'ct_pair prepare'")
    with open(record_path) as fh:
        record = json.load(fh)
    candidates = [os.path.join(disp_dir, disp_name(record["fixed_id"], record["moving_id"], s)) for s in ("long", "short")]
    disp = next((p for p in candidates if os.path.isfile(p)), None)
    if disp is None:
        raise DatasetError(f"{disp_dir}: no displacement file {os.path.basename(candidates[0])} (or the short name)")
    f_img = read_image(record["fixed"])
    m_img = read_image(record["moving"])
    m_lab = read_label(record["moving_label"], m_img, record["moving"]) if record["moving_label"] else None
    f_lab = read_label(record["fixed_label"], f_img, record["fixed"]) if record["fixed_label"] else None
    grid = itk.imread(os.path.join(prepared_dir, "imagesTr", f"{TASK}_{record['fixed_id']}_0000.nii.gz"), itk.F)
    prealign = itk.transformread(os.path.join(prepared_dir, "prealign.tfm"))[0]
    field = _field_transform(disp, grid)

    total = itk.CompositeTransform[itk.D, 3].New()
    total.AddTransform(prealign)
    total.AddTransform(field)  # applied first: fixed point -> + field -> pre-alignment -> moving point
    outputs = {"warped_moving.nii.gz": _resample(m_img, f_img, total, nearest=False, default=AIR_HU)}
    metrics = None
    if m_lab is not None:
        warped_label = _resample(m_lab, f_img, total, nearest=True, default=0)
        outputs["warped_moving_label.nii.gz"] = warped_label
        if f_lab is not None:
            fixed_arr = itk.array_from_image(f_lab)
            affine_only = itk.array_from_image(_resample(m_lab, f_img, prealign, nearest=True, default=0))
            after = _dice(fixed_arr, itk.array_from_image(warped_label))
            before = _dice(fixed_arr, affine_only)
            metrics = {
                "dice_per_label": after, "mean_dice": float(np.mean(list(after.values()))) if after else None,
                "dice_per_label_prealign_only": before,
                "mean_dice_prealign_only": float(np.mean(list(before.values()))) if before else None,
                "labels_in_both": sorted(after, key=int), "prealign": record["prealign"],
            }  # fmt: skip
    to_field = itk.TransformToDisplacementFieldFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.D].New(
        Transform=total, UseReferenceImage=True, ReferenceImage=f_img
    )
    to_field.Update()
    outputs["displacement_mm.nii.gz"] = to_field.GetOutput()
    with _staged_dir(out_dir) as tmp:
        for name, im in outputs.items():
            _write(im, os.path.join(tmp, name))
        if metrics is not None:
            with open(os.path.join(tmp, "metrics.json"), "w") as fh:
                json.dump(metrics, fh, indent=2)
    return metrics or {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="read, check and resample a CT pair into a Learn2Reg-layout folder")
    p.add_argument("--fixed", required=True, help="NIfTI file or DICOM series folder")
    p.add_argument("--moving", required=True, help="NIfTI file or DICOM series folder")
    p.add_argument("--fixed_label")
    p.add_argument("--moving_label")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--prealign", default="none", choices=PREALIGN_KINDS)
    p.add_argument("--init_transform", help="ITK affine transform file, fixed -> moving (starts or replaces --prealign)")
    p.add_argument("--spacing", type=float, default=2.0, help="mm, isotropic (default 2, as AbdomenCTCT)")
    p.add_argument("--orientation", default="RAS", help="axis codes of the prepared arrays (default RAS)")
    p.add_argument("--size", type=int, nargs=3, help="grid size in voxels, multiples of 16 (default: the fixed extent)")
    r = sub.add_parser("restore", help="warp the original moving scan onto the fixed scan's own grid")
    r.add_argument("--prepared_dir", required=True)
    r.add_argument("--disp_dir", required=True, help="output_dir of the bundle inference")
    r.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            rec = prepare(args.fixed, args.moving, args.out_dir, args.fixed_label, args.moving_label, args.prealign,
                          args.init_transform, args.spacing, args.orientation, args.size)  # fmt: skip
            print(f"wrote {args.out_dir}: grid {rec['grid_size']} at {rec['spacing']} mm ({rec['orientation']})")
        else:
            metrics = restore(args.prepared_dir, args.disp_dir, args.out_dir)
            print(f"wrote {args.out_dir}" + (f": mean Dice {metrics['mean_dice']:.3f} on labels {metrics['labels_in_both']} "
                  f"(pre-alignment only: {metrics['mean_dice_prealign_only']:.3f})" if metrics.get("mean_dice") is not None else ""))
    except (DatasetError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
