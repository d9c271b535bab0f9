"""The release archive (``python -m scripts.release``) as the bundle registry would host it: reproducible,
holding only the tracked bundle files, and, served by a real ``http.server`` on 127.0.0.1 and fetched
with the real ``python -m monai.bundle download`` client, a bundle that registers the sample pair
exactly as the repository does. Also the state of ``large_files.yml`` for the release."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import forkserver
import nibabel as nib
import numpy as np
import pytest
import yaml

from scripts import release

ROOT = Path(__file__).resolve().parents[1]
META = json.loads((ROOT / "configs" / "metadata.json").read_text())
BUNDLE_ID = release.bundle_id(META["name"])
ZIP_NAME = f"{BUNDLE_ID}_v{META['version']}.zip"
# No PYTHONPATH: a command run in the downloaded bundle must import that bundle's own scripts.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    "OMP_NUM_THREADS": "1",
    "NO_PROXY": "127.0.0.1",
    "no_proxy": "127.0.0.1",
}


pytestmark = pytest.mark.slow  # end-to-end runs of the real commands


def run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd``; fails the test with its output on a non-zero exit."""
    proc = forkserver.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@contextlib.contextmanager
def serve(folder: Path):
    """A real HTTP server for the files of ``folder`` on 127.0.0.1 in a thread: yields (base URL, the
    paths requested)."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep the test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requested
    finally:
        httpd.shutdown()
        httpd.server_close()


def tracked_release_paths() -> list[str]:
    """What git tracks under the release's top-level files and folders, sorted."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *release.INCLUDE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return sorted(p for p in out.split("\0") if p)


def test_archive_is_reproducible_and_holds_only_the_tracked_bundle_files(tmp_path):
    proc = run("-m", "scripts.release", "--out", str(tmp_path / "a"), cwd=ROOT)
    digest, path = proc.stdout.split()  # the format of sha256sum: "<sha256>  <path>"
    archive = Path(path)
    assert archive.name == ZIP_NAME and archive.parent == tmp_path / "a"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == digest
    # built again elsewhere: the same bytes
    again, digest_again = release.build(str(tmp_path / "b"), str(ROOT))
    assert digest_again == digest and Path(again).read_bytes() == archive.read_bytes()

    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        tracked = tracked_release_paths()
        assert [i.filename for i in infos] == [f"{BUNDLE_ID}/{p}" for p in tracked]  # sorted, one top folder
        for info, rel in zip(infos, tracked, strict=True):
            assert z.read(info) == (ROOT / rel).read_bytes(), rel
            assert info.date_time == release.DATE_TIME and not info.is_dir(), info
    for needed in (
        *release.REQUIRED,
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
        "scripts/__init__.py",
        "requirements.txt",
    ):
        assert needed in tracked, f"{needed} is missing from the release"
    # what must never be packed, though the working tree may hold it
    for rel in tracked:
        top = rel.split("/")[0]
        assert top not in {".venv", "runs", "eval", "tests", ".ci", "benchmarks", "dist"}, rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc") and rel != "large_files.yml", rel


def test_release_refuses_weights_that_disagree_with_large_files_and_an_unlisted_version(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=120)
    index = clone / "large_files.yml"
    original = index.read_text()
    content = yaml.safe_load(original)
    (entry,) = [e for e in content["large_files"] if e["path"] == "models/model.pt"]
    entry["hash_val"] = "0" * 64
    index.write_text(yaml.safe_dump(content))
    out = tmp_path / "out"
    refused = r"models/model.pt: sha256 \w+ differs from its hash_val 0+ in large_files.yml"
    with pytest.raises(release.ReleaseError, match=refused):
        release.build(str(out), str(clone))
    assert not out.exists() or not any(out.iterdir()), "an archive was written despite the refusal"

    index.write_text(original)
    meta = json.loads((clone / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    (clone / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(release.ReleaseError, match=r"metadata.json: version 9.9.9 has no entry in 'changelog'"):
        release.build(str(out), str(clone))


def _fields(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}


def test_downloaded_release_registers_exactly_like_the_repository(tmp_path):
    """The registry's path end to end: the archive and the weights served over HTTP, the bundle fetched
    with MONAI's own client, the weights fetched again with the verified downloader, then one sample
    pair registered from the downloaded copy and from the repository: the same fields, bit for bit."""
    www = tmp_path / "www"
    www.mkdir()
    archive, _ = release.build(str(www), str(ROOT))
    entries = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    (weights,) = [e for e in entries if e["path"] == "models/model.pt"]
    hosted_name = weights["url"].rsplit("/", 1)[-1]
    shutil.copy(ROOT / "models" / "model.pt", www / hosted_name)

    downloads = tmp_path / "downloads"
    with serve(www) as (url, requested):
        run(
            "-m",
            "monai.bundle",
            "download",
            "--name",
            BUNDLE_ID,
            "--bundle_dir",
            str(downloads),
            "--url",
            f"{url}/{Path(archive).name}",
            "--progress",
            "False",
            cwd=tmp_path,
        )
        bundle = downloads / BUNDLE_ID
        assert (bundle / "models" / "model.pt").read_bytes() == (ROOT / "models" / "model.pt").read_bytes()
        # the Model Zoo's own flow: a bundle folder without its weights, which come from their URL
        (bundle / "models" / "model.pt").unlink()
        fetched = run(
            "-m",
            "scripts.weights",
            "download",
            "--path",
            "models/model.pt",
            "--large_files",
            str(ROOT / "large_files.yml"),
            "--url_override",
            f"{url}/{hosted_name}",
            cwd=bundle,
        )
        assert "models/model.pt: downloaded (sha256 verified)" in fetched.stdout, fetched.stdout
    assert requested == [f"/{Path(archive).name}", f"/{hosted_name}"], requested

    dataset = json.loads((ROOT / "sample_data" / "HippocampusMR" / "HippocampusMR_dataset.json").read_text())
    pair = dataset["registration_val"][0]
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text(f"fixed,moving\n{pair['fixed']},{pair['moving']}\n")
    outputs = {}
    for name, folder in (("downloaded", bundle), ("repository", ROOT)):
        outputs[name] = tmp_path / f"out_{name}"
        run(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--output_dir",
            str(outputs[name]),
            "--figures",
            "False",
            "--pairs_selection",
            str(pairs_csv),
            cwd=folder,
        )

    ours, theirs = _fields(outputs["downloaded"]), _fields(outputs["repository"])
    assert sorted(ours) == sorted(theirs) and any(n.startswith("disp_") for n in ours), (sorted(ours), sorted(theirs))
    for name, img in ours.items():
        other = theirs[name]
        assert img.get_data_dtype() == other.get_data_dtype() and np.array_equal(img.affine, other.affine), name
        assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(other.dataobj)), f"{name} differs"
    manifests = [json.loads((outputs[n] / "manifest.json").read_text()) for n in ("downloaded", "repository")]
    assert manifests[0]["checkpoint"]["sha256"] == manifests[1]["checkpoint"]["sha256"] == weights["hash_val"]


def test_large_files_name_the_current_version_and_hash_their_files():
    entries = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    problems = []
    for entry in entries:
        if f"_v{META['version']}." not in entry["url"].rsplit("/", 1)[-1]:
            problems.append(f"{entry['path']}: URL {entry['url']} does not name version {META['version']}")
        path = ROOT / entry["path"]
        actual = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "no file"
        if entry.get("hash_type") != "sha256" or entry.get("hash_val") != actual:
            problems.append(f"{entry['path']}: hash_val {entry.get('hash_val')!r}, file sha256 {actual}")
    assert not problems, "large_files.yml: " + "; ".join(problems)


def test_shipped_torchscript_is_the_shipped_checkpoint_of_this_version():
    """models/model.ts must be models/model.pt exported (re-export after changing either: docs/tooling.md)
    with this release's metadata: same DDF on a real pair's size, and the embedded version is this one."""
    import torch
    from monai.bundle import ConfigParser

    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ROOT / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == META["version"], "model.ts exported with another version"
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ROOT / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    image = torch.rand(1, 2, 48, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, exported = net(image), scripted(image)
    assert eager.abs().max() > 0.05, "the comparison would be vacuous"
    assert (eager - exported).abs().max() <= 1e-4
