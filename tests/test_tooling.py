"""Bundle tooling (issue 6): verified weight downloads from a real local HTTP server, safe checkpoint
loading, ``verify_net_in_out``, TorchScript export with ``ckpt_export`` and inference from the
exported ``model.ts`` alone."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from scripts import weights

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# --------------------------------------------------------------------------------------------------
# large_files.yml and scripts/weights.py against a real HTTP server on 127.0.0.1


@pytest.fixture
def server(tmp_path):
    """A real HTTP server in a thread on an ephemeral port, serving ``tmp_path / "www"``.

    Yields (base_url, served_folder, requested_paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requested
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _bundle_with(tmp_path: Path, entries: list[dict]) -> Path:
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    return root


def _payload(seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(300_000)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_shipped_large_files_yml_lists_every_weight_file_in_model_zoo_format():
    entries = weights.read_large_files(str(ROOT))
    assert {e["path"] for e in entries} == {"models/model.pt", "models/model.ts"}
    for e in entries:
        assert set(e) == {"path", "url", "hash_val", "hash_type"}, e
        assert e["hash_type"] == "sha256"
        assert e["url"].startswith("https://")
    # The path inference.json loads by default is one of them.
    infer = json.loads((ROOT / "configs" / "inference.json").read_text())
    assert "'models', 'model.pt'" in infer["ckpt_path"]


def test_good_file_is_fetched_verified_and_not_fetched_again(tmp_path, server):
    base, www, requested = server
    data = _payload()
    (www / "model.pt").write_bytes(data)
    (www / "model.ts").write_bytes(data[::-1])
    root = _bundle_with(tmp_path, [
        {"path": "models/model.pt", "url": f"{base}/model.pt", "hash_val": _sha(data), "hash_type": "sha256"},
        {"path": "models/model.ts", "url": f"{base}/model.ts", "hash_val": _sha(data[::-1]), "hash_type": "sha256"},
    ])
    assert weights.download(bundle_root=str(root)) == {"models/model.pt": "downloaded", "models/model.ts": "downloaded"}
    assert (root / "models" / "model.pt").read_bytes() == data
    assert (root / "models" / "model.ts").read_bytes() == data[::-1]
    assert _leftovers(root / "models") == ["model.pt", "model.ts"], "temporary files left behind"
    assert requested == ["/model.pt", "/model.ts"]

    # Present with the right hash: skipped, no request.
    assert weights.download(path="models/model.pt", bundle_root=str(root)) == {"models/model.pt": "present"}
    assert requested == ["/model.pt", "/model.ts"]


def test_tampered_file_is_refused_and_nothing_is_written(tmp_path, server):
    base, www, _ = server
    good = _payload()
    tampered = bytearray(good)
    tampered[1000] ^= 0xFF
    (www / "model.pt").write_bytes(bytes(tampered))
    root = _bundle_with(tmp_path, [
        {"path": "models/model.pt", "url": f"{base}/model.pt", "hash_val": _sha(good), "hash_type": "sha256"},
    ])
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root))
    msg = str(err.value)
    assert "models/model.pt" in msg and _sha(good) in msg and _sha(bytes(tampered)) in msg, msg
    assert _leftovers(root / "models") == [], "a tampered download was written"


def test_tampered_download_leaves_an_existing_file_untouched(tmp_path, server):
    base, www, _ = server
    (www / "model.pt").write_bytes(_payload(1))
    root = _bundle_with(tmp_path, [
        {"path": "models/model.pt", "url": f"{base}/model.pt", "hash_val": _sha(_payload(0)), "hash_type": "sha256"},
    ])
    old = b"an older local copy"
    (root / "models" / "model.pt").write_bytes(old)
    with pytest.raises(weights.WeightsError, match="does not match"):
        weights.download(bundle_root=str(root))
    assert (root / "models" / "model.pt").read_bytes() == old
    assert _leftovers(root / "models") == ["model.pt"]


def test_http_404_is_refused_with_the_url_and_nothing_written(tmp_path, server):
    base, _, requested = server
    url = f"{base}/not_there.pt"
    root = _bundle_with(tmp_path, [
        {"path": "models/model.pt", "url": url, "hash_val": _sha(b"x"), "hash_type": "sha256"},
    ])
    with pytest.raises(weights.WeightsError) as err:
        weights.download(bundle_root=str(root))
    assert url in str(err.value) and "404" in str(err.value) and "models/model.pt" in str(err.value)
    assert requested == ["/not_there.pt"]
    assert _leftovers(root / "models") == []


def test_cli_download_url_override_hash_and_errors(tmp_path, server, capsys):
    """The documented command lines: exit codes and messages as a user sees them (two in a real
    subprocess, the others through the same entry point in-process)."""
    base, www, _ = server
    data = _payload(2)
    (www / "mirror.pt").write_bytes(data)
    root = _bundle_with(tmp_path, [
        {"path": "models/model.pt", "url": f"{base}/gone.pt", "hash_val": _sha(data), "hash_type": "sha256"},
        {"path": "models/model.ts", "url": f"{base}/gone.ts", "hash_val": "", "hash_type": "sha256"},
    ])

    def cli(*args: str) -> tuple[int, str, str]:
        code = weights.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    # The listed URL is a 404: non-zero exit, one-line error naming the URL, no traceback.
    proc = run("-m", "scripts.weights", "download", "--path", "models/model.pt", "--bundle_root", str(root))
    assert proc.returncode == 1 and f"{base}/gone.pt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # A mirror with the same content: accepted (the hash still comes from large_files.yml).
    code, out, err = cli("download", "--path", "models/model.pt", "--url_override", f"{base}/mirror.pt",
                         "--bundle_root", str(root))
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


def test_average_is_the_tensorwise_mean_and_refuses_other_architectures(tmp_path):
    from scripts.networks import SpatialGradientRegNet

    def net(seed):
        torch.manual_seed(seed)
        n = SpatialGradientRegNet(channels=(4, 8), encoder_convs=(1,), decoder_convs=(1,), deep_supervision=False)
        for p in n.parameters():
            torch.nn.init.normal_(p)
        return n

    a, b = net(0), net(1)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    # a resumable checkpoint and DDP prefixes are read as load_pretrained reads them
    torch.save({"model": {"module." + k: v for k, v in b.state_dict().items()}, "optimizer": {}}, tmp_path / "b.pt")
    out = tmp_path / "avg" / "mean.pt"
    ok(run("-m", "scripts.weights", "average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(out)))
    mean = weights.load_pretrained(net(2), str(out)).state_dict()
    for k, v in a.state_dict().items():
        assert torch.allclose(mean[k], (v + b.state_dict()[k]) / 2, atol=1e-6), k
    assert not torch.allclose(mean["head.weight"], a.state_dict()["head.weight"])

    other = SpatialGradientRegNet(channels=(4, 16), encoder_convs=(1,), decoder_convs=(1,), deep_supervision=False)
    torch.save(other.state_dict(), tmp_path / "c.pt")
    bad = tmp_path / "bad.pt"
    proc = run("-m", "scripts.weights", "average", str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), "--out", str(bad))
    assert proc.returncode != 0 and "c.pt" in proc.stderr and "architecture" in proc.stderr
    assert not bad.exists() and sorted(os.listdir(tmp_path)) == ["a.pt", "avg", "b.pt", "c.pt"]


# --------------------------------------------------------------------------------------------------
# Checkpoint loading: torch.load(weights_only=True) everywhere


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: the proof that a checkpoint could run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_configs_load_checkpoints_only_through_weights_only_loaders():
    """Every checkpoint the configs read goes through MONAI's CheckpointLoader, which calls
    torch.load(..., weights_only=True); no config or script calls torch.load itself."""
    import inspect

    from monai.handlers import CheckpointLoader

    from scripts.weights import CheckpointLoader as BundleLoader

    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)
    assert issubclass(BundleLoader, CheckpointLoader) and "super().__call__(engine)" in inspect.getsource(BundleLoader.__call__)
    loaders = 0
    for name in ("train", "inference", "evaluate", "multi_gpu_train"):
        text = (ROOT / "configs" / f"{name}.json").read_text()
        assert "torch.load" not in text and "pickle" not in text, name
        assert '"CheckpointLoader"' not in text, f"{name}.json: use scripts.weights.CheckpointLoader (names the file)"
        loaders += text.count('"scripts.weights.CheckpointLoader"')
    assert loaders == 2  # inference's ckpt_path and train's resume_ckpt
    for script in (ROOT / "scripts").glob("*.py"):
        text = script.read_text()
        assert "torch.load(" not in text or "weights_only=True" in text, script.name
        assert "weights_only=False" not in text, script.name


@pytest.mark.parametrize("what", ["object", "dict_with_object", "truncated"])
def test_inference_refuses_a_pickled_object_or_truncated_checkpoint(tmp_path, what):
    marker = tmp_path / "code_ran"
    payload = _RunsCodeWhenUnpickled(str(marker))
    ckpt = tmp_path / "evil.pt"
    if what == "truncated":  # e.g. a checkpoint whose writer was killed (MONAI's CheckpointSaver is not atomic)
        net, _ = _config_network()
        torch.save(net.state_dict(), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:100_000])
    else:
        torch.save(payload if what == "object" else {"encoder.weight": payload}, ckpt)
    out = tmp_path / "out"
    proc = run("-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--ckpt_path", str(ckpt), "--output_dir", str(out))
    assert proc.returncode != 0
    if what == "truncated":
        assert f"{ckpt}: cannot load this checkpoint" in proc.stderr, proc.stderr[-3000:]
    else:
        assert f"{ckpt}: refused by torch.load(weights_only=True)" in proc.stderr, proc.stderr[-3000:]
        assert "Unsupported global" in proc.stderr
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert not out.exists() or not any(out.iterdir()), "output written from a refused checkpoint"


# --------------------------------------------------------------------------------------------------
# verify_net_in_out, ckpt_export (trace) and inference from model.ts alone


def _config_network(channels=None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    if channels is not None:
        parser["channels"] = channels
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("preprocessing")


def test_verify_net_in_out_passes():
    proc = ok(run("-m", "monai.bundle", "verify_net_in_out", "network_def",
                  "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"))
    assert "verified with no error" in proc.stdout + proc.stderr


def test_ckpt_export_torchscript_matches_eager_and_runs_inference_alone(tmp_path):
    torch.manual_seed(0)
    net, preprocessing = _config_network()  # the configs' default network (the shipped architecture)
    with torch.no_grad():  # away from the zero-initialised identity head, so the DDF is not trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = tmp_path / "model.pt"
    torch.save(net.state_dict(), state)
    ts = tmp_path / "model.ts"
    ok(run("-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(state),
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
           "--key_in_ckpt", "", "--use_trace", "True", "--input_shape", "[1, 2, 64, 64, 64]"))

    # A real sample pair, preprocessed as inference does.
    pair = json.loads((SAMPLE / "HippocampusMR_dataset.json").read_text())["registration_val"][0]
    imgs = [preprocessing({"image": str(SAMPLE / pair[r])})["image"].as_tensor() for r in ("moving", "fixed")]
    image = torch.cat(imgs)[None]
    net.eval()
    scripted = torch.jit.load(str(ts), map_location="cpu")
    extra = {"metadata.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    with torch.no_grad():
        eager = net(image)
        traced = scripted(image)
    assert eager.shape == traced.shape == (1, 3, 64, 64, 64)
    assert eager.abs().max() > 0.1, "the test network is the identity; the comparison would be vacuous"
    assert (eager - traced).abs().max() <= 1e-4

    # Inference from model.ts alone: the network replaced by the TorchScript file, the checkpoint
    # loader disabled, the .pt deleted.
    state.unlink()
    out = tmp_path / "out"
    ok(run("-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--network_def", f"$torch.jit.load('{ts}', map_location=@device)", "--handlers#0#_disabled_", "True",
           "--ckpt_path", str(state), "--output_dir", str(out), "--figures", "False"))
    f_id, m_id = Path(pair["fixed"]).name[14:18], Path(pair["moving"]).name[14:18]
    disp = np.asarray(nib.load(out / f"disp_{f_id}_0000_{m_id}_0000.nii.gz").dataobj)
    assert np.abs(disp - eager[0].permute(1, 2, 3, 0).numpy()).max() <= 1e-4
