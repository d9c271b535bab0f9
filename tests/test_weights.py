"""scripts/weights.py: verified weight downloads from a real HTTP server on 127.0.0.1 (hash, deadline,
size cap, leftovers of killed downloads, permissions, MONAI's ``download_large_files`` on the same
index), and checkpoint loading with ``torch.load(weights_only=True)`` (files that are not checkpoints
told apart from checkpoints holding pickled objects, ``check_checkpoint``, ``load_pretrained``)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ignite.engine import Engine

from scripts import weights
from scripts.networks import SpatialGradientRegNet
from scripts.weights import CheckpointError, CheckpointLoader, check_checkpoint, load_pretrained, read_state_dict
from tests.test_tooling import ROOT, ok, run

TRICKLE_BYTES = 200  # at TRICKLE_DELAY s each: 20 s, far beyond the deadlines the tests set
TRICKLE_DELAY = 0.1


# --------------------------------------------------------------------------------------------------
# Downloads against a real HTTP server on 127.0.0.1


@pytest.fixture
def server(tmp_path):
    """A real HTTP server in a thread on an ephemeral port, serving the files of ``tmp_path / "www"``
    and misbehaving URLs: ``/trickle`` (announces 200 bytes, sends one every 0.1 s),
    ``/trickle_headers`` (sends its response headers one byte every 0.1 s), ``/stall`` and ``/short``
    (announce 200 bytes, send 10, then wait 20 s / close the connection) and ``/no_length/<file>``
    (the file without a Content-Length header, the body ending when the connection closes).

    Yields (base_url, served_folder, requested_paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requested: list[str] = []
    closing = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            requested.append(self.path)
            try:
                if self.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", str(TRICKLE_BYTES))
                    self.end_headers()
                    self._trickle(b"x" * TRICKLE_BYTES)
                elif self.path == "/trickle_headers":
                    self._trickle(b"HTTP/1.0 200 OK\r\nX-Slow: " + b"x" * TRICKLE_BYTES + b"\r\n\r\n")
                elif self.path in ("/stall", "/short"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(TRICKLE_BYTES))
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    if self.path == "/stall":
                        closing.wait(20)
                elif self.path.startswith("/no_length/"):
                    body = (www / self.path[len("/no_length/") :]).read_bytes()
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    super().do_GET()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass

        def _trickle(self, data: bytes) -> None:
            for i in range(len(data)):
                if closing.wait(TRICKLE_DELAY):
                    return
                self.wfile.write(data[i : i + 1])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requested
    finally:
        closing.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def umask_027():
    """A umask that neither the default 0o022 nor mkstemp's private 0o600 would pass for."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _bundle_with(tmp_path: Path, entries: list[dict]) -> Path:
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    return root


def _entry(url: str, data: bytes, path: str = "models/model.pt") -> dict:
    return {"path": path, "url": url, "hash_val": _sha(data), "hash_type": "sha256"}


def _payload(seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(300_000)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_shipped_large_files_yml_lists_every_weight_file_in_model_zoo_format():
    entries = weights.read_large_files(str(ROOT))
    shipped = {f"models/{p.name}" for p in (ROOT / "models").iterdir() if p.suffix in (".pt", ".ts")}
    assert {"models/model.pt", "models/model.ts", "models/seg_hippocampus.pt"} <= shipped
    assert {e["path"] for e in entries} == shipped
    for e in entries:
        # MONAI's download_large_files passes every key to download_url: any other key breaks it.
        assert set(e) == {"path", "url", "hash_val", "hash_type"}, e
        assert e["hash_type"] == "sha256"
        assert e["url"].startswith("https://")
    # The path inference.json loads by default is one of them.
    infer = json.loads((ROOT / "configs" / "inference.json").read_text())
    assert "'models', 'model.pt'" in infer["ckpt_path"]


def test_monai_download_large_files_reads_a_copy_of_the_shipped_index(tmp_path, server):
    """The shipped large_files.yml, its URLs pointed at the local server, is read by MONAI's own
    ``python -m monai.bundle download_large_files --bundle_path`` and by ``scripts.weights download``;
    both install every shipped weight file (models/model.pt, models/model.ts, models/seg_hippocampus.pt) with
    its listed sha256."""
    base, www, _ = server
    index = yaml.safe_load((ROOT / "large_files.yml").read_text())
    assert all(e["hash_val"] for e in index["large_files"]), "every released file has its hash"
    for entry in index["large_files"]:
        name = os.path.basename(entry["path"])
        entry["url"] = f"{base}/{name}"
        shutil.copy(ROOT / entry["path"], www / name)
    for name in ("monai", "ours"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "large_files.yml").write_text(yaml.safe_dump(index))
    ok(run("-m", "monai.bundle", "download_large_files", "--bundle_path", str(tmp_path / "monai")))
    ours = weights.download(bundle_root=str(tmp_path / "ours"))
    assert ours == {e["path"]: "downloaded" for e in index["large_files"]}
    for entry in index["large_files"]:
        shipped = (ROOT / entry["path"]).read_bytes()
        assert (tmp_path / "monai" / entry["path"]).read_bytes() == shipped
        assert (tmp_path / "ours" / entry["path"]).read_bytes() == shipped


def test_monai_download_large_files_gaps_listed_in_the_docs(tmp_path, server):
    """The rows of docs/tooling.md's table for MONAI 1.6.1's download_large_files, as measured."""
    from urllib.error import HTTPError

    from monai.apps.utils import HashCheckError
    from monai.bundle.scripts import download_large_files

    base, www, _ = server
    good = _payload()
    (www / "model.pt").write_bytes(good[::-1])  # tampered
    root = _bundle_with(tmp_path, [_entry(f"{base}/model.pt", good)])
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(root))
    assert _leftovers(root / "models") == []
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [_entry(f"{base}/gone.pt", good)]}))
    with pytest.raises(HTTPError) as err:
        download_large_files(bundle_path=str(root))
    assert "models/model.pt" not in str(err.value)  # the error does not say which file
    (root / "models" / "model.pt").write_bytes(b"an older local copy")
    (www / "model.pt").write_bytes(good)
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [_entry(f"{base}/model.pt", good)]}))
    with pytest.raises(HashCheckError):  # an existing file with a wrong hash is never replaced
        download_large_files(bundle_path=str(root))
    assert (root / "models" / "model.pt").read_bytes() == b"an older local copy"
    with pytest.raises(UnboundLocalError):
        download_large_files(bundle_path=str(root), large_file_name="large_files.yml")
    # scripts.weights replaces it by a verified download.
    assert weights.download(bundle_root=str(root)) == {"models/model.pt": "downloaded"}
    assert (root / "models" / "model.pt").read_bytes() == good


def test_good_file_is_fetched_verified_and_not_fetched_again(tmp_path, server, umask_027):
    base, www, requested = server
    data = _payload()
    (www / "model.pt").write_bytes(data)
    (www / "model.ts").write_bytes(data[::-1])
    root = _bundle_with(
        tmp_path, [_entry(f"{base}/model.pt", data), _entry(f"{base}/model.ts", data[::-1], "models/model.ts")]
    )
    assert weights.download(bundle_root=str(root)) == {"models/model.pt": "downloaded", "models/model.ts": "downloaded"}
    assert (root / "models" / "model.pt").read_bytes() == data
    assert (root / "models" / "model.ts").read_bytes() == data[::-1]
    assert _leftovers(root / "models") == ["model.pt", "model.ts"], "temporary files left behind"
    assert requested == ["/model.pt", "/model.ts"]
    # Normal permissions (the umask's), not the private mode of the temporary file.
    assert _mode(root / "models" / "model.pt") == _mode(root / "models" / "model.ts") == umask_027

    # Present with the right hash: skipped, no request.
    assert weights.download(path="models/model.pt", bundle_root=str(root)) == {"models/model.pt": "present"}
    assert requested == ["/model.pt", "/model.ts"]


def test_tampered_file_is_refused_and_nothing_is_written(tmp_path, server):
    base, www, _ = server
    good = _payload()
    tampered = bytearray(good)
    tampered[1000] ^= 0xFF
    (www / "model.pt").write_bytes(bytes(tampered))
    root = _bundle_with(tmp_path, [_entry(f"{base}/model.pt", good)])
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root))
    msg = str(err.value)
    assert "models/model.pt" in msg and _sha(good) in msg and _sha(bytes(tampered)) in msg, msg
    assert _leftovers(root / "models") == [], "a tampered download was written"


def test_tampered_download_leaves_an_existing_file_untouched(tmp_path, server):
    base, www, _ = server
    (www / "model.pt").write_bytes(_payload(1))
    root = _bundle_with(tmp_path, [_entry(f"{base}/model.pt", _payload(0))])
    old = b"an older local copy"
    (root / "models" / "model.pt").write_bytes(old)
    with pytest.raises(weights.WeightsError, match="does not match"):
        weights.download(bundle_root=str(root))
    assert (root / "models" / "model.pt").read_bytes() == old
    assert _leftovers(root / "models") == ["model.pt"]


def test_http_404_is_refused_with_the_url_and_nothing_written(tmp_path, server):
    base, _, requested = server
    url = f"{base}/not_there.pt"
    root = _bundle_with(tmp_path, [_entry(url, b"x")])
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root))
    assert url in str(err.value) and "404" in str(err.value) and "models/model.pt" in str(err.value)
    assert requested == ["/not_there.pt"]
    assert _leftovers(root / "models") == []


@pytest.mark.parametrize("phase", ["body", "headers"])
def test_a_trickling_server_is_stopped_by_the_deadline(tmp_path, server, phase):
    """One byte every 0.1 s never triggers the 60 s per-read timeout; the overall deadline stops it,
    whether the bytes are the body's or the response headers' (on which urlopen blocks)."""
    base, _, _ = server
    url = f"{base}/trickle" if phase == "body" else f"{base}/trickle_headers"
    root = _bundle_with(tmp_path, [_entry(url, b"x" * TRICKLE_BYTES)])
    (root / "models" / "model.pt").write_bytes(b"an older local copy")
    start = time.monotonic()
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root), timeout=60, max_seconds=1)
    elapsed = time.monotonic() - start
    assert 1 <= elapsed < 5, elapsed  # the whole trickle would take 20 s
    msg = str(err.value)
    assert "models/model.pt" in msg and url in msg and "--max_seconds 1" in msg, msg
    assert (root / "models" / "model.pt").read_bytes() == b"an older local copy"
    assert _leftovers(root / "models") == ["model.pt"], "temporary file left behind"


@pytest.mark.parametrize(
    "path, problem",
    [
        ("/stall", "failed: no data for --timeout 1 seconds"),
        ("/short", "incomplete: the connection closed after 10 of 200 bytes"),
    ],
)
def test_a_stalled_or_short_download_is_refused(tmp_path, server, path, problem):
    base, _, _ = server
    root = _bundle_with(tmp_path, [_entry(base + path, b"x" * TRICKLE_BYTES)])
    start = time.monotonic()
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root), timeout=1)
    assert time.monotonic() - start < 10  # /stall would hold the connection for 20 s
    assert str(err.value) == f"models/model.pt: download of {base}{path} {problem}"
    assert _leftovers(root / "models") == []


@pytest.mark.parametrize("announced", [True, False], ids=["content_length", "no_content_length"])
def test_a_file_larger_than_max_bytes_is_refused(tmp_path, server, announced):
    base, www, _ = server
    data = _payload()
    (www / "model.pt").write_bytes(data)
    url = f"{base}/model.pt" if announced else f"{base}/no_length/model.pt"
    root = _bundle_with(tmp_path, [_entry(url, data)])
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root), max_bytes=100_000)
    msg = str(err.value)
    assert "models/model.pt" in msg and url in msg and "--max_bytes 100000" in msg, msg
    # Refused on the announced size before the body is read; else once the cap is passed.
    assert ("announces 300000 bytes" in msg) == announced, msg
    assert _leftovers(root / "models") == []
    # The same file within the cap, without a Content-Length: accepted.
    assert weights.download(bundle_root=str(root), max_bytes=300_000) == {"models/model.pt": "downloaded"}


def test_a_killed_download_leaves_a_temporary_file_the_next_download_removes(tmp_path, server):
    base, www, _ = server
    data = _payload()
    (www / "model.pt").write_bytes(data)
    root = _bundle_with(tmp_path, [_entry(f"{base}/trickle", data)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.weights", "download", "--bundle_root", str(root)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(f".tmp-{proc.pid}-") for n in os.listdir(root / "models")):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [n for n in _leftovers(root / "models") if n.startswith(f".tmp-{proc.pid}-")], "nothing left to clean"
    assert weights.download(bundle_root=str(root), url_override=f"{base}/model.pt", path="models/model.pt") == {
        "models/model.pt": "downloaded"
    }
    assert _leftovers(root / "models") == ["model.pt"]


def test_every_hash_is_checked_before_anything_is_downloaded(tmp_path, server):
    base, www, requested = server
    (www / "model.pt").write_bytes(_payload())
    root = _bundle_with(
        tmp_path,
        [
            _entry(f"{base}/model.pt", _payload()),
            {"path": "models/model.ts", "url": f"{base}/model.ts", "hash_val": "", "hash_type": "sha256"},
        ],
    )
    with pytest.raises(weights.WeightsError, match="models/model.ts: .*unverified"):
        weights.download(bundle_root=str(root))
    assert requested == [] and _leftovers(root / "models") == []
    for option in ("timeout", "max_seconds", "max_bytes"):
        with pytest.raises(weights.WeightsError, match=f"--{option} must be a positive number"):
            weights.download(bundle_root=str(root), path="models/model.pt", **{option: 0})
    assert requested == []


def test_bad_index_or_destination_is_refused_before_any_request(tmp_path, server):
    base, www, requested = server
    data = _payload()
    (www / "model.pt").write_bytes(data)
    root = _bundle_with(tmp_path, [_entry(f"{base}/model.pt", data)])
    index = root / "large_files.yml"
    cases = [
        ("large_files: [", f"{index}: not a readable YAML file"),
        ("files: []", f"{index}: needs a non-empty 'large_files' list"),
        (yaml.safe_dump({"large_files": [{"path": "models/model.pt"}]}), f"{index}: entry 0 needs 'path' and 'url'"),
        (
            yaml.safe_dump({"large_files": [_entry(f"{base}/model.pt", data, "../model.pt")]}),
            f"{index}: entry 0 path '../model.pt' must stay inside the bundle",
        ),
        (
            yaml.safe_dump({"large_files": [{**_entry(f"{base}/model.pt", data), "hash_type": "md5"}]}),
            "models/model.pt: hash_type 'md5' is not supported (use sha256)",
        ),
    ]
    for text, message in cases:
        index.write_text(text)
        with pytest.raises(weights.WeightsError) as err:
            weights.download(bundle_root=str(root))
        assert message in str(err.value), (text, str(err.value))
    with pytest.raises(weights.WeightsError, match="other.yml: not a readable YAML file"):
        weights.download(bundle_root=str(root), large_files="other.yml")
    # The destination folder below a regular file.
    index.write_text(yaml.safe_dump({"large_files": [_entry(f"{base}/model.pt", data, "models/model.pt/x.pt")]}))
    (root / "models" / "model.pt").write_bytes(b"a file, not a folder")
    with pytest.raises(weights.WeightsError, match=r"models/model.pt/x.pt: output folder .*model.pt is a file"):
        weights.download(bundle_root=str(root))
    assert requested == []
    assert _leftovers(root / "models") == ["model.pt"]


def test_cli_download_url_override_hash_and_errors(tmp_path, server, capsys):
    """The documented command lines: exit codes and messages as a user sees them (two in a real
    subprocess, the others through the same entry point in-process)."""
    base, www, _ = server
    data = _payload(2)
    (www / "mirror.pt").write_bytes(data)
    root = _bundle_with(
        tmp_path,
        [
            _entry(f"{base}/gone.pt", data),
            {"path": "models/model.ts", "url": f"{base}/gone.ts", "hash_val": "", "hash_type": "sha256"},
        ],
    )

    def cli(*args: str) -> tuple[int, str, str]:
        code = weights.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    # The listed URL is a 404: non-zero exit, one-line error naming the URL, no traceback.
    proc = run("-m", "scripts.weights", "download", "--path", "models/model.pt", "--bundle_root", str(root))
    assert proc.returncode == 1 and f"{base}/gone.pt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # A mirror with the same content: accepted (the hash still comes from large_files.yml).
    code, out, err = cli(
        "download", "--path", "models/model.pt", "--url_override", f"{base}/mirror.pt", "--bundle_root", str(root)
    )
    assert code == 0 and "models/model.pt: downloaded" in out, err
    assert (root / "models" / "model.pt").read_bytes() == data
    # An entry without hash_val is never installed.
    code, _, err = cli("download", "--path", "models/model.ts", "--bundle_root", str(root))
    assert code == 1 and "models/model.ts" in err and "unverified" in err, err
    assert not (root / "models" / "model.ts").exists()
    # --url_override without --path would apply to several files.
    code, _, err = cli("download", "--url_override", f"{base}/mirror.pt", "--bundle_root", str(root))
    assert code == 1 and "--path" in err
    # A path not in the list.
    code, _, err = cli("download", "--path", "models/other.pt", "--bundle_root", str(root))
    assert code == 1 and "models/other.pt" in err
    assert _leftovers(root / "models") == ["model.pt"]
    # The helper that fills hash_val, as documented.
    proc = ok(run("-m", "scripts.weights", "hash", str(root / "models" / "model.pt")))
    assert proc.stdout.strip() == _sha(data)
    code, _, err = cli("hash", str(root / "models" / "nothing.pt"))
    assert code == 1 and "nothing.pt: no such file" in err


# --------------------------------------------------------------------------------------------------
# Checkpoint loading: torch.load(weights_only=True), errors naming the file and the problem


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: the proof that a checkpoint could run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _small_net(**kw) -> SpatialGradientRegNet:
    return SpatialGradientRegNet(
        **{"channels": (4, 8), "encoder_convs": (1,), "decoder_convs": (1,), "deep_supervision": False, **kw}
    )


def _write_bad(path: Path, kind: str, marker: Path) -> None:
    """A file ``torch.load(weights_only=True)`` must refuse: not a checkpoint at all, or a real
    checkpoint holding pickled objects."""
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "text":
        path.write_text("model weights go here\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_zip":  # e.g. a checkpoint whose writer was killed
        torch.save(_small_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "torchscript":
        net = torch.nn.Linear(2, 2)
        torch.jit.trace(net, torch.ones(1, 2)).save(str(path))
    elif kind == "object":
        torch.save(_RunsCodeWhenUnpickled(str(marker)), path)
    elif kind == "dict_with_object":
        torch.save({"encoder.weight": _RunsCodeWhenUnpickled(str(marker))}, path)
    elif kind == "numpy_array":
        torch.save({"encoder.weight": np.ones(3)}, path)


NOT_CHECKPOINTS = {
    "random_bytes": "not a PyTorch checkpoint: neither the zip archive nor the legacy file",
    "text": "not a PyTorch checkpoint: neither the zip archive nor the legacy file",
    "empty": "not a PyTorch checkpoint: the file is empty",
    "truncated_zip": "not a PyTorch checkpoint: a truncated or corrupt zip archive",
    "torchscript": "a TorchScript export (model.ts), not a checkpoint",
}
PICKLED = {"object": "io.open", "dict_with_object": "io.open", "numpy_array": "numpy"}


@pytest.mark.parametrize("kind", [*NOT_CHECKPOINTS, *PICKLED])
def test_not_a_checkpoint_is_told_apart_from_pickled_objects(tmp_path, kind):
    """Through read_state_dict (load_pretrained, averaging, check_checkpoint) and the bundle's
    CheckpointLoader on a real ignite Engine (inference's ckpt_path, train's resume_ckpt): one line
    naming the file and which of the two problems it is; no code from the file runs."""
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "bad.pt"
    _write_bad(ckpt, kind, marker)
    errors = []
    with pytest.raises(CheckpointError) as err:
        read_state_dict(str(ckpt))
    errors.append(str(err.value))
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(str(ckpt))
    errors.append(str(err.value))
    engine = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(ckpt), load_dict={"model": _small_net()}).attach(engine)
    with pytest.raises(CheckpointError) as err:
        engine.run([0], max_epochs=1)
    errors.append(str(err.value))
    for msg in errors:
        assert msg.startswith(f"{ckpt}: ") and "\n" not in msg, msg
        if kind in NOT_CHECKPOINTS:
            assert NOT_CHECKPOINTS[kind] in msg and "pickled" not in msg, msg
        else:
            assert "refused by torch.load(weights_only=True): the file holds pickled Python objects" in msg, msg
            assert PICKLED[kind] in msg, msg
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_checkpoint_loader_loads_state_dicts_and_resumable_checkpoints_strictly(tmp_path):
    """The bundle's CheckpointLoader is MONAI's: it loads the weights (a plain state dict or the
    ``model`` entry of a resumable checkpoint) and refuses another architecture, naming the file."""
    source = _small_net()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"model": source.state_dict(), "optimizer": {}}, tmp_path / "resumable.pt")
    for name in ("plain.pt", "resumable.pt"):
        target = _small_net()
        engine = Engine(lambda engine, batch: None)
        CheckpointLoader(load_path=str(tmp_path / name), load_dict={"model": target}).attach(engine)
        engine.run([0], max_epochs=1)
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), (name, k)
    engine = Engine(lambda engine, batch: None)
    other = _small_net(channels=(4, 16))
    CheckpointLoader(load_path=str(tmp_path / "plain.pt"), load_dict={"model": other}).attach(engine)
    with pytest.raises(CheckpointError) as err:
        engine.run([0], max_epochs=1)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'plain.pt'}: cannot load this checkpoint") and "size mismatch" in msg, msg
    assert "\n" not in msg


def test_check_checkpoint(tmp_path):
    good = tmp_path / "model.pt"
    torch.save(_small_net().state_dict(), good)
    assert check_checkpoint(str(good)) == str(good)
    missing = "./models/model_never_trained.pt"
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(missing)
    msg = str(err.value)
    assert msg.startswith(f"{missing}: checkpoint not found. Train one (configs/train.json") and "\n" not in msg
    assert "--ckpt_path <file>" in msg and "python -m scripts.weights download" in msg
    with pytest.raises(CheckpointError, match=r"checkpoint not found\. Train one \(configs/seg_train\.json "):
        check_checkpoint(missing, train_config="configs/seg_train.json")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        check_checkpoint(str(tmp_path))
    torch.save({"epoch": torch.tensor(3), "note": "no weights"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a state dict"):
        check_checkpoint(str(tmp_path / "other.pt"))


def test_missing_checkpoint_stops_the_ct_overlay_before_any_work(tmp_path):
    """The CT overlay ships no weights: with ``check_checkpoint(@ckpt_path)`` first in ``initialize``
    (added here by an overlay, as proposed for configs/inference.json) the run stops on one line
    saying what to do, before the dataset is read or the output folder created."""
    init = json.loads((ROOT / "configs" / "inference.json").read_text())["initialize"]
    check = "$scripts.weights.check_checkpoint(@ckpt_path)"
    if check not in init:  # before the output folder and the dataset are checked
        at = next((i for i, e in enumerate(init) if "check_output_dir" in e), 0)
        init = [*init[:at], check, *init[at:]]
    overlay = tmp_path / "check_checkpoint.json"
    overlay.write_text(json.dumps({"initialize": init}))
    out = tmp_path / "out"
    configs = ["configs/inference.json", "configs/abdomen_ct.json", str(overlay)]
    proc = run(
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(configs),
        "--output_dir",
        str(out),
        "--dataset_dir",
        str(tmp_path / "no_data"),
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "checkpoint not found" in line]
    assert lines == [
        "scripts.weights.CheckpointError: ./models/model_abdomen_ct.pt: checkpoint not found. Train one "
        "(configs/train.json with the same config files as this run, see docs/README.md), fetch it with "
        "python -m scripts.weights download if large_files.yml lists it, or pass --ckpt_path <file>"
    ], proc.stderr[-3000:]
    assert "no_data" not in proc.stderr, "the dataset was checked before the checkpoint"
    assert not out.exists()


@pytest.mark.parametrize("what", ["object", "dict_with_object", "truncated_zip"])
def test_inference_refuses_a_pickled_object_or_truncated_checkpoint(tmp_path, what):
    """The real inference config, as a user runs it."""
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "evil.pt"
    _write_bad(ckpt, what, marker)
    out = tmp_path / "out"
    proc = run(
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--ckpt_path",
        str(ckpt),
        "--output_dir",
        str(out),
    )
    assert proc.returncode != 0
    if what == "truncated_zip":
        expected = f"{ckpt}: not a PyTorch checkpoint: a truncated or corrupt zip archive"
        assert expected in proc.stderr, proc.stderr[-3000:]
    else:
        assert f"{ckpt}: refused by torch.load(weights_only=True)" in proc.stderr, proc.stderr[-3000:]
        assert "it needs io.open" in proc.stderr
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert not out.exists() or not any(out.iterdir()), "output written from a refused checkpoint"


def test_configs_load_checkpoints_only_through_weights_only_loaders():
    """Every checkpoint the configs read goes through the bundle's CheckpointLoader (tested above:
    weights_only, errors naming the file) or load_pretrained (read_state_dict); no config calls
    torch.load itself, and no script calls it without weights_only=True."""
    from pydoc import locate

    from monai.bundle.config_item import ComponentLocator
    from monai.handlers import CheckpointLoader as MonaiLoader

    def resolve(target: str):
        """The class a ``_target_`` names, resolved as MONAI's ConfigComponent does (short names too)."""
        module = ComponentLocator().get_component_module_name(target)
        return locate(target if module is None else f"{module if isinstance(module, str) else module[0]}.{target}")

    def targets(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                yield node["_target_"]
            for v in node.values():
                yield from targets(v)
        elif isinstance(node, list):
            for v in node:
                yield from targets(v)

    def expressions(node):
        if isinstance(node, str) and node.startswith("$"):
            yield node
        elif isinstance(node, (dict, list)):
            for v in node.values() if isinstance(node, dict) else node:
                yield from expressions(v)

    loaders = 0
    for config in sorted((ROOT / "configs").glob("*.json")):
        content = json.loads(config.read_text())
        for target in targets(content):
            cls = resolve(target)
            if isinstance(cls, type) and issubclass(cls, MonaiLoader):
                assert issubclass(cls, CheckpointLoader), f"{config.name}: {target} does not name the file in errors"
                loaders += 1
        for expr in expressions(content):
            assert "torch.load" not in expr and "pickle" not in expr, (config.name, expr)
    assert loaders >= 3  # inference's ckpt_path, train's and seg_train's resume_ckpt
    for script in (ROOT / "scripts").glob("*.py"):
        text = script.read_text()
        assert "torch.load(" not in text or "weights_only=True" in text, script.name
        assert "weights_only=False" not in text, script.name


def test_load_pretrained_exact_or_refused(tmp_path):
    def net(**kw):
        return SpatialGradientRegNet(**{"channels": (4, 8, 16, 32, 64), "deep_supervision": False, **kw})

    source = net()
    plain, resumable, ddp = tmp_path / "plain.pt", tmp_path / "ckpt.pt", tmp_path / "ddp.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"model": source.state_dict(), "optimizer": {}}, resumable)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, ddp)
    for path in (plain, resumable, ddp):
        loaded = load_pretrained(net(), str(path))
        for k, v in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (path.name, k)
    untouched = net()
    assert load_pretrained(untouched, "") is untouched
    for other, what in (
        (net(channels=(8, 16, 32, 64, 128)), "tensors of another shape"),
        (net(in_channels=3), "tensors of another shape"),  # a CT network (3 HU windows)
        (net(deep_supervision=True), "network tensors absent from the file"),
    ):
        with pytest.raises(CheckpointError, match="another architecture or task") as e:
            load_pretrained(other, str(plain))
        assert str(plain) in str(e.value) and what in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(untouched, str(tmp_path / "missing.pt"))
