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

A DICOM folder must hold one series of evenly spaced slices. The output folder is checked first,
then every input is read and checked, and the size of the grid and the memory it needs, before
anything is resampled or written; each output folder is written into a staging folder next to it
and published whole (``scripts.files.staged_dir``), with the umask's permissions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import numbers
import os
import sys
from functools import partial

import itk
import nibabel as nib
import numpy as np

from scripts.files import check_output_dir, staged_dir
from scripts.learn2reg import DatasetError, check_hounsfield, disp_name
from scripts.metrics import dice_per_label

__all__ = [
    "available_memory",
    "check_grid_args",
    "common_grid",
    "prealign_transform",
    "prepare",
    "read_image",
    "read_label",
    "restore",
    "write_image",
    "write_json",
    "write_output",
    "write_transform",
]

TASK = "CTPair"
FIXED_ID, MOVING_ID = "0001", "0002"
AIR_HU = -1024.0
# direction of increasing array index for each orientation letter, in ITK's LPS physical frame
_AXIS = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "I": (0, 0, -1), "S": (0, 0, 1)}

PREALIGN_KINDS = ("none", "center", "translation", "affine")

# Air is about -1000 HU and every abdominal CT holds some (outside the body, in the bowel): a scan with
# no voxel below this has not been rescaled (DICOM RescaleSlope/Intercept, NIfTI scl_slope/scl_inter).
# The network halves the grid 4 times; at 10 mm a 40 cm abdomen is 40 voxels, 2.5 at the coarsest level.
MAX_SPACING_MM = 10.0
# 8.5 times the AbdomenCTCT grid (192 x 160 x 256 = 7.9 M voxels), e.g. 406^3 voxels: full-volume CPU
# inference took 5.3 GB on the AbdomenCTCT grid, and its memory grows with the voxels. The CT overlay's
# inference refuses more than its max_voxels (2^24 by default: 24 GB machines), which a user with more
# memory raises with --max_voxels.
MAX_GRID_VOXELS = 2**26
# The pair as the CT overlay's network reads it: 2 images x 3 CT windows x float32. More than
# prepare itself holds per voxel (two float32 images, two int16 label maps).
PAIR_BYTES_PER_VOXEL = 2 * 3 * 4
# Slices further from the series' median spacing than this fraction: a missing slice is 100 % off;
# positions stored to 0.01 mm stay within it down to 0.2 mm slices.
SLICE_SPACING_TOLERANCE = 0.1


# --------------------------------------------------------------------------- reading and checks
def _last_line(error: Exception) -> str:
    """ITK's messages are long C++ traces: their last line says what went wrong."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def _matrix(image) -> np.ndarray:
    return np.array(itk.array_from_matrix(image.GetDirection()), dtype=float)


def _dicom_files(folder: str) -> list[str]:
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(folder)
    uids = list(names.GetSeriesUIDs())
    if not uids:
        raise DatasetError(f"{folder}: no DICOM series found in this folder")
    if len(uids) > 1:
        raise DatasetError(
            f"{folder}: holds {len(uids)} DICOM series ({', '.join(u[:40] for u in uids)}); "
            "give a folder with exactly one series"
        )
    return list(names.GetFileNames(uids[0]))


def _check_slice_positions(folder: str, files: list[str]) -> None:
    """Refuses a series whose slices are not evenly spaced along their normal: two files at one
    position, or a gap (a missing slice). ITK stacks them anyway with one spacing, warning only on
    stderr, and every slice after the gap lands at the wrong place."""
    positions = []
    for path in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(path)
        io.ReadImageInformation()  # the header only
        if not positions:
            normal = np.cross(io.GetDirection(0), io.GetDirection(1))  # ImageOrientationPatient rows x columns
        positions.append(float(np.dot([io.GetOrigin(i) for i in range(3)], normal)))  # ImagePositionPatient, mm
    order = np.argsort(positions)
    pos = np.array(positions)[order]
    names = [os.path.basename(files[i]) for i in order]
    steps = np.diff(pos)
    for i in np.flatnonzero(steps < 1e-3):  # DICOM positions are stored to about 1e-3 mm or finer
        raise DatasetError(
            f"{folder}: {names[i]} and {names[i + 1]} are slices at the same position ({pos[i]:g} mm along the "
            "slice normal): remove the duplicate"
        )
    step = float(np.median(steps))
    for i in np.flatnonzero(np.abs(steps - step) > SLICE_SPACING_TOLERANCE * step):
        kind = "a slice is missing" if steps[i] > step else "uneven slice spacing"
        raise DatasetError(
            f"{folder}: slice positions {pos[i]:g} and {pos[i + 1]:g} mm along the slice normal ({names[i]}, "
            f"{names[i + 1]}) are {steps[i]:g} mm apart where the series' spacing is {step:g} mm: {kind}"
        )


def _check_dimension(path: str) -> None:
    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise DatasetError(f"{path}: not an image file ITK can read")
    io.SetFileName(path)
    try:
        io.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot read the image header: {_last_line(e)}") from e
    dims = [io.GetDimensions(i) for i in range(io.GetNumberOfDimensions())]
    if len(dims) != 3 or io.GetNumberOfComponents() != 1:
        kind = f"{len(dims)}-D" if len(dims) != 3 else f"{io.GetNumberOfComponents()}-component"
        raise DatasetError(f"{path}: expected a 3-D single-channel image, got a {kind} image of size {dims}")


def read_image(path: str, check_hu: bool = True):
    """A CT scan as an ITK float image: a NIfTI (or any ITK format) file, or a folder with one DICOM
    series of evenly spaced slices (rescale slope/intercept applied by GDCM). Refuses 2-D/4-D
    images, non-finite values and, with ``check_hu``, values that are not Hounsfield units."""
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            files = _dicom_files(path)
            if len(files) < 2:
                raise DatasetError(f"{path}: the DICOM series has {len(files)} slice; a 3-D scan is needed")
            _check_slice_positions(path, files)
            reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(FileNames=files, ImageIO=itk.GDCMImageIO.New())
            reader.Update()
            image = reader.GetOutput()
        else:
            _check_dimension(path)
            image = itk.imread(path, itk.F)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: cannot read the image: {_last_line(e)}") from e
    values = itk.array_view_from_image(image)
    if not np.isfinite(values).all():
        raise DatasetError(f"{path}: image has NaN or infinite voxels")
    if check_hu:
        check_hounsfield(values, path)
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
        raise DatasetError(f"{path}: cannot read the label map: {_last_line(e)}") from e
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
def check_grid_args(spacing: float, orientation: str = "RAS", size=None, multiple: int = 16) -> np.ndarray:
    """Refuses grid arguments that give no usable grid, before anything is read: a spacing that is
    not a number of millimetres in (0, ``MAX_SPACING_MM``], an orientation that is not three
    different axis codes, a size that is not 3 positive multiples of ``multiple``.

    Returns:
        (3, 3) direction matrix of the grid: column c = direction of array axis c in ITK's LPS frame.
    """
    if not (isinstance(spacing, numbers.Real) and math.isfinite(spacing) and 0 < spacing <= MAX_SPACING_MM):
        raise ValueError(f"spacing must be a number of millimetres in (0, {MAX_SPACING_MM:g}], got {spacing}")
    code = orientation.upper()
    if len(code) != 3 or any(c not in _AXIS for c in code):
        raise ValueError(f"orientation must be 3 axis codes like RAS or LPS, got {orientation!r}")
    direction = np.array([_AXIS[c] for c in code], dtype=float).T
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-6:
        raise ValueError(f"orientation {orientation!r} does not name three different axes")
    if size is not None and (len(size) != 3 or any(int(n) <= 0 or int(n) % multiple for n in size)):
        raise ValueError(f"grid size must be 3 positive multiples of {multiple}, got {list(size)}")
    return direction


def available_memory() -> tuple[float, str]:
    """Bytes this process can still allocate, and what limits them: the machine's available memory
    (``MemAvailable`` of /proc/meminfo: free memory plus caches the kernel can drop) or, if less, the
    room left under this process's address-space limit (``ulimit -v``). ``(inf, "")`` where
    neither is known (not Linux)."""
    avail, where = math.inf, ""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024.0
        where = "available on this machine (MemAvailable)"
    except (OSError, StopIteration):
        pass
    try:
        import resource  # Unix only: the bundle, which imports this module, also runs on Windows
    except ImportError:
        return avail, where
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/status") as f:
                used = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        except (OSError, StopIteration):
            used = 0
        if limit - used < avail:
            avail = float(limit - used)
            where = f"left under this process's address-space limit (ulimit -v {limit // 1024})"
    return avail, where


def _check_grid_size(shape, spacing: float, name: str) -> None:
    """Refuses, before anything is resampled, a grid of more than ``MAX_GRID_VOXELS`` voxels or one
    whose pair, as the network reads it (``PAIR_BYTES_PER_VOXEL``), needs more memory than
    ``available_memory``.

    Args:
        shape: (3,) float grid size in voxels (float: a tiny spacing gives sizes beyond int64).
    """
    voxels = float(np.prod(shape))
    need = voxels * PAIR_BYTES_PER_VOXEL
    avail, where = available_memory()
    size = " x ".join(f"{n:g}" for n in shape)
    grid = f"{name}: a grid of {size} voxels ({voxels:.3g}) at {spacing:g} mm around this scan"
    pair = f"the pair as the network reads it (2 images x 3 CT windows x float32) needs {need / 1e9:.3g} GB"
    fix = "use a larger --spacing or a smaller --size"
    if voxels > MAX_GRID_VOXELS:
        raise ValueError(f"{grid} is more than the maximum of {MAX_GRID_VOXELS:,} voxels; {pair}: {fix}")
    if need > avail:
        raise ValueError(f"{grid}: {pair}, more than the {avail / 1e9:.3g} GB {where}: {fix}")


def common_grid(
    fixed, spacing: float = 2.0, orientation: str = "RAS", multiple: int = 16, size=None, name: str = "the fixed scan"
):
    """An empty reference image: ``spacing`` mm isotropic, array axes along ``orientation``
    (NIfTI axis codes, e.g. RAS), covering the fixed scan's extent (or exactly ``size`` voxels),
    centred on it, each size a multiple of ``multiple`` (the network halves the grid 4 times).
    Nothing is allocated: the arguments (``check_grid_args``) and the grid's voxels and memory
    (``MAX_GRID_VOXELS``, ``available_memory``) are checked first; ``name`` (the fixed scan's file)
    is named in the messages."""
    direction = check_grid_args(spacing, orientation, size, multiple)
    corners = _corners(fixed) @ direction  # in the new axes
    low, high = corners.min(0), corners.max(0)
    if size is None:
        n = np.ceil((high - low) / spacing) + 1
        n = np.ceil(n / multiple) * multiple
    else:
        n = np.array(size, dtype=float)
    _check_grid_size(n, spacing, name)
    n = n.astype(int)
    centre = (low + high) / 2
    origin = direction @ (centre - spacing * (n - 1) / 2)
    ref = itk.Image[itk.F, 3].New()
    ref.SetRegions([int(x) for x in n])
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetOrigin([float(x) for x in origin])
    ref.SetDirection(itk.matrix_from_array(direction))
    return ref


def _resample(image, reference, transform, nearest: bool, default: float):
    interpolator = (itk.NearestNeighborInterpolateImageFunction if nearest else itk.LinearInterpolateImageFunction).New(
        image
    )
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
            raise DatasetError(f"{init}: not an ITK affine transform file: {_last_line(e)}") from e
    if kind == "none" or (kind == "center" and init is not None):
        return transform
    if init is None:
        centre_f, centre_m = _corners(fixed).mean(0), _corners(moving).mean(0)
        transform.SetCenter([float(c) for c in centre_f])
        transform.SetTranslation([float(t) for t in centre_m - centre_f])
    if kind == "center":
        return transform

    def clip(im):  # soft tissue
        return itk.clamp_image_filter(im, bounds=(-200.0, 400.0))

    f, m = clip(fixed), clip(moving)
    # translation: a translation t (fixed frame) is optimised after the start transform, which stays
    # fixed: x -> start(x + t); folded back into the affine below
    optimised = itk.TranslationTransform[itk.D, 3].New() if kind == "translation" else transform
    metric_type = itk.MattesMutualInformationImageToImageMetricv4[itk.Image[itk.F, 3], itk.Image[itk.F, 3]]
    metric = metric_type.New(NumberOfHistogramBins=32)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=1.0, MinimumStepLength=1e-3, NumberOfIterations=200, RelaxationFactor=0.5
    )
    scales = itk.RegistrationParameterScalesFromPhysicalShift[metric_type].New(Metric=metric)
    optimizer.SetScalesEstimator(scales)
    reg = itk.ImageRegistrationMethodv4[itk.Image[itk.F, 3], itk.Image[itk.F, 3]].New(
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
    shift = np.array(itk.array_from_matrix(transform.GetMatrix()), dtype=float) @ np.array(
        optimised.GetOffset(), dtype=float
    )
    transform.SetTranslation([float(a + b) for a, b in zip(transform.GetTranslation(), shift, strict=True)])
    return transform


# --------------------------------------------------------------------------- output helpers
def write_image(image, path: str) -> None:
    """Writes an ITK image as compressed NIfTI and reads the file back to its end: ITK's NIfTI
    writer reports a short write (disk full, file size limit) only on stderr and leaves a truncated
    file behind, without an error."""
    itk.imwrite(image, path, compression=True)
    try:
        header = nib.load(path).header
        voxels = int(np.prod(header.get_data_shape()))
        expected = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
        written = 0
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                written += len(chunk)
    except Exception as e:  # whatever stops the read-back (truncated gzip stream, header), the file is unusable
        raise OSError(f"written incompletely (disk full?): {_last_line(e)}") from e
    if written < expected:
        raise OSError(f"written incompletely (disk full?): {written} of {expected} bytes")


def write_transform(transform, path: str) -> None:
    """Writes an ITK transform file and reads it back: ``itk.transformwrite`` ignores failed writes
    (a full disk leaves an empty or truncated file without an error)."""
    itk.transformwrite([transform], path)
    try:
        back = itk.transformread(path)[0]
        same = np.allclose(back.GetParameters(), transform.GetParameters(), rtol=1e-12, atol=0)
    except Exception as e:
        raise OSError(f"written incompletely (disk full?): {_last_line(e)}") from e
    if not same:
        raise OSError("written incompletely (disk full?): the parameters read back differ")


def write_json(obj, path: str) -> None:
    """``json.dump`` refusing NaN and infinities, which are not JSON."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, allow_nan=False)


def write_output(staging: str, out_dir: str, rel: str, write) -> None:
    """Calls ``write(path)`` for the file ``rel`` of an output folder being written into ``staging``
    (``scripts.files.staged_dir``), creating its sub-folder. A failure (disk full, ...; ITK raises
    RuntimeError with a C++ trace) becomes a one-line OSError naming the file's final path
    ``out_dir/rel``, not the staging folder."""
    path = os.path.join(staging, rel)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path)
    except (OSError, RuntimeError) as e:
        raise OSError(f"cannot write {os.path.join(out_dir, rel)}: {_last_line(e)}") from e


def _write_folder(out_dir: str, outputs: dict) -> None:
    """Writes ``outputs`` ({file name relative to ``out_dir``: function(path) writing it}) into a
    staging folder published as ``out_dir`` once every file is written."""
    with staged_dir(out_dir) as tmp:
        for rel, write in outputs.items():
            write_output(tmp, out_dir, rel, write)


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
    ``labelsTr``, the pre-alignment ``prealign.tfm`` and ``ct_pair.json`` for ``restore``).

    Order of the checks, each refusing with a message naming the file or argument before anything is
    written: the output folder (absent or empty, writable), the grid arguments, the fixed scan, the
    grid's size and memory, the moving scan, the label maps, the overlap after pre-alignment."""
    check_output_dir(out_dir, overwrite=False, overwrite_option=None)
    check_grid_args(spacing, orientation, size)
    f_img = read_image(fixed)
    grid = common_grid(f_img, spacing, orientation, size=size, name=fixed)
    m_img = read_image(moving)
    f_lab = read_label(fixed_label, f_img, fixed) if fixed_label else None
    m_lab = read_label(moving_label, m_img, moving) if moving_label else None
    transform = prealign_transform(f_img, m_img, prealign, init_transform)
    identity = itk.IdentityTransform[itk.D, 3].New()

    images = {
        FIXED_ID: _resample(f_img, grid, identity, nearest=False, default=AIR_HU),
        MOVING_ID: _resample(m_img, grid, transform, nearest=False, default=AIR_HU),
    }
    moved = itk.array_view_from_image(images[MOVING_ID])
    if float(moved.max()) == float(moved.min()):
        raise DatasetError(
            f"{moving}: does not overlap the fixed scan {fixed} after pre-alignment {prealign!r} (scanner "
            "coordinates of different patients rarely do): use --prealign center or affine, or --init_transform"
        )
    labels = {}
    if f_lab is not None and m_lab is not None:  # the dataset lists labels only for both
        labels = {
            FIXED_ID: _resample(f_lab, grid, identity, True, 0),
            MOVING_ID: _resample(m_lab, grid, transform, True, 0),
        }

    def name(i):
        return f"{TASK}_{i}_0000.nii.gz"

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
    outputs = {f"imagesTr/{name(i)}": partial(write_image, im) for i, im in images.items()}
    outputs |= {f"labelsTr/{name(i)}": partial(write_image, lab) for i, lab in labels.items()}
    outputs["prealign.tfm"] = partial(write_transform, transform)
    outputs[f"{TASK}_dataset.json"] = partial(write_json, index)
    outputs["ct_pair.json"] = partial(write_json, record)
    _write_folder(out_dir, outputs)
    return record


def _field_transform(disp_path: str, grid):
    """The Learn2Reg displacement file (voxels along the array axes of the prepared grid, shape
    (X, Y, Z, 3)) as an ITK displacement field transform in physical LPS millimetres. A field
    of another shape or with NaN / infinite values is refused, naming the file."""
    try:
        ddf = np.asarray(nib.load(disp_path).dataobj, dtype=np.float64)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DatasetError(f"{disp_path}: cannot read the displacement field: {_last_line(e)}") from e
    expected = (*itk.size(grid), 3)
    if ddf.shape != tuple(expected):
        raise DatasetError(f"{disp_path}: displacement field of shape {ddf.shape}, expected {tuple(expected)}")
    bad = int(np.count_nonzero(~np.isfinite(ddf)))
    if bad:
        raise DatasetError(f"{disp_path}: displacement field has {bad} NaN or infinite values")
    step = _matrix(grid) @ np.diag(itk.spacing(grid))  # column c: physical step of array axis c
    # Filled through a view of an allocated Image[Vector[D, 3], 3]: itk.image_from_array(is_vector=True)
    # gives a VectorImage, which SetDisplacementField accepts but reads with the wrong stride.
    field = itk.Image[itk.Vector[itk.D, 3], 3].New()
    field.CopyInformation(grid)
    field.SetRegions(grid.GetLargestPossibleRegion())
    field.Allocate()
    itk.array_view_from_image(field)[:] = (ddf @ step.T).transpose(2, 1, 0, 3)  # (Z, Y, X, 3) LPS mm
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    return transform


def _read_prepared(prepared_dir: str):
    """The record (``ct_pair.json``), the grid (the prepared fixed image) and the pre-alignment of a
    folder written by ``prepare``; an unreadable or non-finite one is refused, naming the file."""
    record_path = os.path.join(prepared_dir, "ct_pair.json")
    if not os.path.isfile(record_path):
        raise DatasetError(f"{prepared_dir}: no ct_pair.json; this folder was not written by 'ct_pair prepare'")
    try:
        with open(record_path) as fh:
            record = json.load(fh)
        grid_path = os.path.join(prepared_dir, "imagesTr", f"{TASK}_{record['fixed_id']}_0000.nii.gz")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{record_path}: not a ct_pair record: {e}") from e
    try:
        grid = itk.imread(grid_path, itk.F)
    except Exception as e:
        raise DatasetError(f"{grid_path}: cannot read the prepared fixed image: {_last_line(e)}") from e
    tfm_path = os.path.join(prepared_dir, "prealign.tfm")
    try:
        prealign = itk.transformread(tfm_path)[0]
    except Exception as e:
        raise DatasetError(f"{tfm_path}: cannot read the pre-alignment: {_last_line(e)}") from e
    if not np.isfinite(list(prealign.GetParameters()) + list(prealign.GetFixedParameters())).all():
        raise DatasetError(f"{tfm_path}: the pre-alignment has NaN or infinite parameters")
    return record, grid, prealign


def _dice_by_label(fixed, warped, moving) -> dict:
    """``scripts.metrics.dice_per_label`` (official rule: the labels present in the fixed and in the
    unwarped moving label map; one warped away scores 0) as {label: Dice} over those labels."""
    labels = [int(v) for v in np.unique(fixed) if v != 0]
    scores = dice_per_label(fixed, warped, moving, labels)
    return {str(k): float(d) for k, d in zip(labels, scores, strict=True) if not np.isnan(d)}


def restore(prepared_dir: str, disp_dir: str, out_dir: str) -> dict:
    """Maps the registration of a prepared pair back to the fixed scan's own grid (see module doc).
    Every input is checked, and every output computed and found finite, before anything is written."""
    check_output_dir(out_dir, overwrite=False, overwrite_option=None)
    record, grid, prealign = _read_prepared(prepared_dir)
    candidates = [
        os.path.join(disp_dir, disp_name(record["fixed_id"], record["moving_id"], s)) for s in ("long", "short")
    ]
    disp = next((p for p in candidates if os.path.isfile(p)), None)
    if disp is None:
        raise DatasetError(f"{disp_dir}: no displacement file {os.path.basename(candidates[0])} (or the short name)")
    field = _field_transform(disp, grid)
    f_img = read_image(record["fixed"])
    m_img = read_image(record["moving"])
    m_lab = read_label(record["moving_label"], m_img, record["moving"]) if record["moving_label"] else None
    f_lab = read_label(record["fixed_label"], f_img, record["fixed"]) if record["fixed_label"] else None

    total = itk.CompositeTransform[itk.D, 3].New()
    total.AddTransform(prealign)
    total.AddTransform(field)  # applied first: fixed point -> + field -> pre-alignment -> moving point
    outputs = {"warped_moving.nii.gz": _resample(m_img, f_img, total, nearest=False, default=AIR_HU)}
    metrics = None
    if m_lab is not None:
        warped_label = _resample(m_lab, f_img, total, nearest=True, default=0)
        outputs["warped_moving_label.nii.gz"] = warped_label
        if f_lab is not None:
            fixed_arr, moving_arr = itk.array_view_from_image(f_lab), itk.array_view_from_image(m_lab)
            affine_only = itk.array_view_from_image(_resample(m_lab, f_img, prealign, nearest=True, default=0))
            after = _dice_by_label(fixed_arr, itk.array_view_from_image(warped_label), moving_arr)
            before = _dice_by_label(fixed_arr, affine_only, moving_arr)
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
    for name, im in outputs.items():  # a finite field of float32-overflowing size would still give Inf here
        if not np.isfinite(itk.array_view_from_image(im)).all():
            raise DatasetError(
                f"{disp}: {os.path.join(out_dir, name)} would hold NaN or infinite values (the displacement field "
                f"composed with {os.path.join(prepared_dir, 'prealign.tfm')} leaves the float32 range); nothing written"
            )
    writers = {name: partial(write_image, im) for name, im in outputs.items()}
    if metrics is not None:
        writers["metrics.json"] = partial(write_json, metrics)
    _write_folder(out_dir, writers)
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
    p.add_argument(
        "--init_transform", help="ITK affine transform file, fixed -> moving (starts or replaces --prealign)"
    )
    p.add_argument("--spacing", type=float, default=2.0,
                   help=f"mm, isotropic, in (0, {MAX_SPACING_MM:g}] (default 2, as AbdomenCTCT)")  # fmt: skip
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
            print(
                f"wrote {args.out_dir}"
                + (
                    f": mean Dice {metrics['mean_dice']:.3f} on labels {metrics['labels_in_both']} "
                    f"(pre-alignment only: {metrics['mean_dice_prealign_only']:.3f})"
                    if metrics.get("mean_dice") is not None
                    else ""
                )
            )
    except (ValueError, OSError) as e:  # DatasetError is a ValueError; FileExistsError, PermissionError are OSErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
