"""The MONAI Label app (apps/monailabel) served by a real ``monailabel start_server`` and called
through its REST API, as 3D Slicer or OHIF call it.

The server runs from its own virtual environment, ``.venv-monailabel`` (created by
``bash apps/monailabel/setup_venv.sh``; ``.ci/run`` creates it in CI, where a missing one fails
the test instead of skipping it). The studies folder is a temporary copy of two held-out real
hippocampus MRIs (not among the atlases), plus a few images the task must refuse.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CT, HIPPO

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "monailabel"
VENV = Path(os.environ.get("MONAILABEL_VENV", ROOT / ".venv-monailabel"))
MONAILABEL = VENV / "bin" / "monailabel"
CT_IMAGE = CT / "subject_a" / "ct.nii.gz"
ATLASES = ROOT / "sample_data" / "HippocampusMR"
IN_CI = os.environ.get("CI", "").lower() == "true"

NUM_ATLASES = 2  # the first two sample atlases by id: 0331, 0338
IMAGES = ["hippocampus_390", "hippocampus_393"]  # held-out validation cases, not atlases, never trained on
LABELS = (1, 2)


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run in CI)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def request(self, method: str, path: str, query: dict | None = None, form: dict | None = None, timeout=300):
        """(status, headers, body bytes) of one HTTP request; HTTP errors are returned, not raised."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = urllib.parse.urlencode(form).encode() if form is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def infer(self, image: str, output: str = "image", **params):
        form = {"params": json.dumps(params)} if params else None
        return self.request("POST", "/infer/atlas_registration", {"image": image, "output": output}, form)


def _write_studies(studies: Path) -> None:
    """Copies of real images (the originals are never touched), and images to refuse."""
    studies.mkdir()
    for name in IMAGES:
        shutil.copy(HIPPO / "imagesTr" / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    ref = nib.load(HIPPO / "imagesTr" / f"{IMAGES[0]}.nii.gz")
    vol = np.asarray(ref.dataobj)
    nib.save(nib.Nifti1Image(vol[:, :, vol.shape[2] // 2].copy(), ref.affine), studies / "slice_2d.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([vol, vol], -1), ref.affine), studies / "two_channels_4d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(vol), ref.affine), studies / "constant.nii.gz")
    (studies / "not_nifti.nii.gz").write_bytes(b"this is not a NIfTI file")
    if CT_IMAGE.is_file():
        ct = nib.load(CT_IMAGE)
        shutil.copy(CT_IMAGE, studies / "abdomen_ct.nii.gz")  # 122x101x112: larger than the field of view
        x, y, z = (s // 2 for s in ct.shape)
        crop = np.asarray(ct.dataobj)[x - 20 : x + 20, y - 20 : y + 20, z - 20 : z + 20]
        nib.save(nib.Nifti1Image(crop, ct.affine), studies / "abdomen_ct_crop.nii.gz")  # CT, hippocampus-sized


@contextmanager
def _serving(tmp: Path, studies: Path, *conf: str):
    """A ``monailabel start_server`` of the app on ``studies`` (with ``--conf`` pairs ``conf``), answering
    on a free port; stopped on exit."""
    port = _free_port()
    log = tmp / "server.log"
    env = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",  # the launcher runs `python`
        "VIRTUAL_ENV": str(VENV),
        "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONHOME", None)
    cmd = [str(MONAILABEL), "start_server", "--app", str(APP), "--studies", str(studies)]
    cmd += ["--conf", "num_atlases", str(NUM_ATLASES), *conf, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if srv.request("GET", "/info/", timeout=10)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"monailabel start_server not answering after 300 s:\n{srv.log_tail()}")
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _check_environment() -> None:
    if not MONAILABEL.is_file():
        _missing(f"{MONAILABEL} missing: create it with `bash apps/monailabel/setup_venv.sh`")
    if not HIPPO.is_dir():
        _missing(f"{HIPPO} missing")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _check_environment()
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = tmp / "studies"
    _write_studies(studies)
    with _serving(tmp, studies) as srv:
        yield srv


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over labels 1 and 2 of the Dice coefficient."""
    return float(
        np.mean([2 * np.sum((pred == k) & (truth == k)) / (np.sum(pred == k) + np.sum(truth == k)) for k in LABELS])
    )


def _identity_baseline(shape) -> np.ndarray:
    """No registration, computed independently of the app: the same atlases' 64^3 label maps cut back
    to the image grid (the inverse of the bundle's centre padding), majority vote with ties to
    background (with two atlases: where both agree)."""
    index = json.loads((ATLASES / "HippocampusMR_dataset.json").read_text())["training"]
    labels = sorted(ATLASES / e["label"] for e in index)[:NUM_ATLASES]
    maps = []
    for path in labels:
        lab = np.asarray(nib.load(path).dataobj).astype(int)
        start = [(big - s) // 2 for big, s in zip(lab.shape, shape, strict=True)]
        maps.append(lab[tuple(slice(b, b + s) for b, s in zip(start, shape, strict=True))])
    votes = np.stack([sum((m == k) for m in maps) for k in range(3)])
    return votes.argmax(0)


def test_info_lists_the_task_with_the_bundle_label_names(server):
    status, _, body = server.request("GET", "/info/")
    assert status == 200, body
    info = json.loads(body)
    task = info["models"]["atlas_registration"]
    label_def = json.loads((ROOT / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"][
        "label_def"
    ]
    assert task["type"] == "segmentation"
    assert task["labels"] == {name: int(value) for value, name in label_def.items() if value != "0"}
    assert task["config"]["num_atlases"] == NUM_ATLASES
    assert info["trainers"] == {}
    assert info["datastore"]["total"] >= len(IMAGES)


@pytest.mark.parametrize("image_id", IMAGES)
def test_segmentation_on_the_image_grid_beats_no_registration(server, image_id, tmp_path):
    status, _, body = server.infer(image_id)
    assert status == 200, body[:2000] + server.log_tail().encode()
    out = tmp_path / "label.nii.gz"
    out.write_bytes(body)
    pred_img = nib.load(out)
    image = nib.load(HIPPO / "imagesTr" / f"{image_id}.nii.gz")
    truth = np.asarray(nib.load(HIPPO / "labelsTr" / f"{image_id}.nii.gz").dataobj).astype(int)

    assert pred_img.shape == image.shape
    np.testing.assert_allclose(pred_img.affine, image.affine, atol=1e-4)
    pred = np.asarray(pred_img.dataobj).astype(int)
    assert set(np.unique(pred)) == {0, 1, 2}

    identity = _identity_baseline(image.shape)
    registered, baseline = _dice(pred, truth), _dice(identity, truth)
    print(f"{image_id}: Dice {registered:.3f} with registration, {baseline:.3f} without ({NUM_ATLASES} atlases)")
    assert registered > baseline + 0.05

    # the app's own no-registration path gives exactly that baseline: the pad/crop inverse is right
    status, _, body = server.infer(image_id, register=False)
    assert status == 200, body[:2000]
    out.write_bytes(body)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj).astype(int), identity)


def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server):
    bad = [
        ("no_such_image", {}, 404, "not in the datastore"),
        ("slice_2d", {}, 400, "expected a 3-D image"),
        ("two_channels_4d", {}, 400, "expected a 3-D image with 1 channel"),
        ("constant", {}, 400, "image is constant"),
        ("not_nifti", {}, 400, "not_nifti.nii.gz"),
        (IMAGES[0], {"atlases": ["0331", "9999"]}, 400, "atlases ['9999'] are not in"),
        (IMAGES[0], {"num_atlases": 99}, 400, "num_atlases must be between 1 and 8"),
        (IMAGES[0], {"num_atlases": "two"}, 400, "num_atlases must be a whole number"),
    ]
    if CT_IMAGE.is_file():
        bad += [
            ("abdomen_ct", {}, 400, "larger than the 64x64x64 field of view"),
            ("abdomen_ct_crop", {}, 400, "looks like a CT"),
        ]
    for image_id, params, code, message in bad:
        status, _, body = server.infer(image_id, **params)
        assert status == code, (image_id, status, body[:2000])
        detail = json.loads(body).get("detail", "")
        assert message in detail, (image_id, detail)
        assert server.proc.poll() is None, server.log_tail()

    # still serving: a good request right after the bad ones, with one atlas this time
    status, _, body = server.infer(IMAGES[1], output="json", num_atlases=1)
    assert status == 200, body[:2000]
    result = json.loads(body)
    assert result["atlases"] == ["0331"] and result["registered"] is True
    assert result["label_names"] == {"anterior": 1, "posterior": 2}


def test_a_test_time_option_set_in_inference_json_applies_to_the_app(server, tmp_path):
    """The app registers through inference.json's ``test_time_inferer`` (what the bundle's own inference
    runs), so an option set in that file changes its label map; here a strong Gaussian smoothing of the
    field (``field_sigma``), in a copy of the bundle whose other parts are links to this one."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in ("scripts", "models"):
        (bundle / name).symlink_to(ROOT / name, target_is_directory=True)
    for f in (ROOT / "configs").iterdir():
        shutil.copy(f, bundle / "configs" / f.name)
    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    assert config["field_sigma"] == 0  # the shipped setting: no smoothing
    config["field_sigma"] = 3.0
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(HIPPO / "imagesTr" / f"{IMAGES[0]}.nii.gz", studies / f"{IMAGES[0]}.nii.gz")

    labels = {}
    with _serving(tmp_path, studies, "--conf", "bundle_path", str(bundle), "--conf", "atlas_dir", str(ATLASES)) as s:
        for name, srv in (("shipped", server), ("smoothed", s)):
            status, _, body = srv.infer(IMAGES[0])
            assert status == 200, body[:2000] + srv.log_tail().encode()
            (tmp_path / f"{name}.nii.gz").write_bytes(body)
            labels[name] = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj).astype(int)
    changed = np.mean(labels["shipped"] != labels["smoothed"])
    print(f"{IMAGES[0]}: {100 * changed:.2f} % of the voxels change label with field_sigma 3")
    assert changed > 0.001
