"""Fetch and verify the bundle's weight files listed in ``large_files.yml``; average checkpoints.

Usage (from the bundle folder)::

    python -m scripts.weights download                          # every entry of large_files.yml
    python -m scripts.weights download --path models/model.pt   # one entry
    python -m scripts.weights download --path models/model.pt --url_override https://mirror/model.pt
    python -m scripts.weights hash models/model.pt              # the sha256 to put in large_files.yml
    python -m scripts.weights average a.pt b.pt c.pt --out avg.pt   # checkpoint averaging

Every file is streamed to a temporary file next to its destination, its sha256 is checked against
``hash_val`` and only then is it renamed to its final name, so a failed, interrupted or tampered
download never leaves a file (or replaces a good one) under the final name. A file already present
with the right hash is not downloaded again. An entry without ``hash_val`` is refused: nothing is
ever installed unverified.

MONAI's own ``python -m monai.bundle download_large_files --bundle_path .`` reads the same file, but in
MONAI 1.6.1 it downloads without any check when ``hash_val`` is empty, raises on an existing file
with a wrong hash instead of replacing it, and crashes with ``--large_file_name`` (see docs/tooling.md).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
import urllib.error
import urllib.request

import torch
import yaml
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader

__all__ = [
    "CheckpointError",
    "CheckpointLoader",
    "WeightsError",
    "download",
    "fetch",
    "hash_file",
    "load_pretrained",
    "read_large_files",
    "sha256_of",
]

CHUNK = 1 << 20
SUPPORTED_HASH = "sha256"


class WeightsError(RuntimeError):
    """A weight file that cannot be fetched or verified; the message names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``torch.load(..., weights_only=True)``, strict by default) whose
    errors name the checkpoint file.

    torch's own messages for a file that holds pickled Python objects ("Weights only load failed ...
    Unsupported global") or a corrupt zip archive do not say which file it was. The original error
    is kept as the cause and its text is repeated (e.g. the ``size mismatch`` lines of a checkpoint
    of another architecture).
    """

    def __call__(self, engine) -> None:
        try:
            super().__call__(engine)
        except pickle.UnpicklingError as e:
            reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
            raise CheckpointError(
                f"{self.load_path}: refused by torch.load(weights_only=True): the file holds pickled Python "
                f"objects, not only tensors (save a plain state dict: torch.save(model.state_dict(), path)). {reason}"
            ) from e
        except Exception as e:
            raise CheckpointError(f"{self.load_path}: cannot load this checkpoint: {e}") from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The network weights stored in ``path``: a plain state dict, or the ``model`` entry of a
    resumable checkpoint; ``module.`` prefixes (DistributedDataParallel) removed. Raises
    ``CheckpointError`` naming the file if it is missing or holds no state dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint of tensors ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def average(*paths: str, out: str) -> str:
    """Checkpoint averaging: writes to ``out`` the plain state dict whose every tensor is the mean of
    that tensor over ``paths`` (plain state dicts or resumable checkpoints, e.g. the last epochs of a
    constant-learning-rate run, as in stochastic weight averaging). All files must hold the same
    tensors with the same shapes; a file that does not is named in the error and nothing is written.
    ``out`` is written under a temporary name and renamed when complete. Returns ``out``.

    The networks here have no batch-norm running statistics (instance norm without them), so the
    averaged weights need no recalibration pass."""
    if len(paths) < 2:
        raise CheckpointError("average needs at least two checkpoints")
    states = [read_state_dict(p) for p in paths]
    ref = states[0]
    for p, state in zip(paths[1:], states[1:]):
        if set(state) != set(ref) or any(state[k].shape != ref[k].shape for k in ref):
            raise CheckpointError(f"{p}: holds other tensors or shapes than {paths[0]}; only checkpoints of one architecture can be averaged")
    for k, v in ref.items():
        if not v.is_floating_point() and any(not torch.equal(s[k], v) for s in states[1:]):
            raise CheckpointError(f"{k}: a non-float tensor that differs between the checkpoints cannot be averaged")
    mean = {
        k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
        for k, v in ref.items()
    }
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save(mean, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{out}: mean of {len(paths)} checkpoints")
    return out


def load_pretrained(network: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """Starts ``network`` from the weights in ``path`` (fine-tuning) and returns it; ``path`` empty
    or None returns it untouched.

    ``path`` may be a plain state dict (``models/model.pt``, the ``model.pt`` a training run saves)
    or a resumable checkpoint of ``configs/train.json`` / ``configs/pretrain.json`` (its ``model``
    entry; the optimizer and trainer state are not used: fine-tuning starts a new run). Weights saved
    from a DistributedDataParallel model (``module.`` prefixes) are accepted.

    Every tensor of the network must come from the file with the same shape, and the file may hold
    nothing else: a checkpoint of another architecture or task (other widths, input channels, deep
    supervision heads, ...) raises ``CheckpointError`` naming the file and listing the differences,
    instead of being loaded partially.
    """
    if not path:
        return network
    state = read_state_dict(path)
    target = network.module if hasattr(network, "module") else network
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the network"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:

        def few(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

        problems = []
        if shapes:
            problems.append(f"{len(shapes)} tensors of another shape ({few(shapes)})")
        if missing:
            problems.append(f"{len(missing)} network tensors absent from the file ({few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} file tensors the network does not have ({few(unexpected)})")
        raise CheckpointError(
            f"{path}: was saved from another architecture or task than this configuration "
            f"({'; '.join(problems)}). Use the same network settings as the run that saved it "
            "(channels, in_channels, deep_supervision, decoder_residual, ...)."
        )
    target.load_state_dict(state, strict=True)
    return network


def read_large_files(bundle_root: str = ".", large_files: str = "large_files.yml") -> list[dict]:
    """The entries of ``large_files.yml`` (relative to ``bundle_root``), each checked for
    ``path``, ``url``, ``hash_val`` and ``hash_type``."""
    index = large_files if os.path.isabs(large_files) else os.path.join(bundle_root, large_files)
    try:
        with open(index) as f:
            content = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise WeightsError(f"{index}: not a readable YAML file ({e})") from e
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise WeightsError(f"{index}: needs a non-empty 'large_files' list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("path") or not entry.get("url"):
            raise WeightsError(f"{index}: entry {i} needs 'path' and 'url', got {entry!r}")
        if os.path.isabs(entry["path"]) or ".." in entry["path"].replace("\\", "/").split("/"):
            raise WeightsError(f"{index}: entry {i} path {entry['path']!r} must stay inside the bundle")
    return entries


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_hash(entry: dict) -> str:
    hash_type = str(entry.get("hash_type") or SUPPORTED_HASH).lower()
    if hash_type != SUPPORTED_HASH:
        raise WeightsError(f"{entry['path']}: hash_type {hash_type!r} is not supported (use sha256)")
    expected = str(entry.get("hash_val") or "").strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise WeightsError(
            f"{entry['path']}: large_files.yml gives no valid sha256 hash_val ({entry.get('hash_val')!r}); "
            "refusing to install an unverified file"
        )
    return expected


def fetch(entry: dict, bundle_root: str = ".", url: str | None = None, timeout: float = 60.0) -> str:
    """Makes ``entry['path']`` (under ``bundle_root``) a verified copy of ``url`` (default: ``entry['url']``).

    Returns "present" when the file already had the right hash, "downloaded" otherwise. Raises
    ``WeightsError`` (naming the file, the URL and, on a mismatch, the expected and actual hashes)
    on an HTTP / network error or a hash mismatch; then nothing is written and a file already at the
    destination is left as it was.
    """
    expected = _expected_hash(entry)
    dest = os.path.join(bundle_root, entry["path"])
    url = url or entry["url"]
    if os.path.isfile(dest) and sha256_of(dest) == expected:
        return "present"
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(dest), dir=folder)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        digest.update(block)
                        out.write(block)
            except urllib.error.HTTPError as e:
                raise WeightsError(f"{entry['path']}: download of {url} failed: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise WeightsError(f"{entry['path']}: download of {url} failed: {e}") from e
        actual = digest.hexdigest()
        if actual != expected:
            raise WeightsError(
                f"{entry['path']}: sha256 of the file downloaded from {url} does not match large_files.yml: "
                f"expected {expected}, got {actual}; nothing was written"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return "downloaded"


def download(
    path: str | None = None,
    url_override: str | None = None,
    bundle_root: str = ".",
    large_files: str = "large_files.yml",
    timeout: float = 60.0,
) -> dict[str, str]:
    """Fetches every entry of ``large_files.yml`` (or the one whose ``path`` is ``path``).

    Args:
        path: only this entry (as written in large_files.yml, e.g. ``models/model.pt``).
        url_override: download from this URL instead (a mirror); the hash is still the one in
            large_files.yml. Needs ``path`` when the file lists several entries.
        bundle_root: the bundle folder; paths in large_files.yml are relative to it.
        large_files: the index file, relative to ``bundle_root``.
        timeout: seconds without data before giving up.

    Returns {path: "present" | "downloaded"}.
    """
    entries = read_large_files(bundle_root, large_files)
    if path is not None:
        wanted = os.path.normpath(path)
        entries = [e for e in entries if os.path.normpath(e["path"]) == wanted]
        if not entries:
            raise WeightsError(f"{path}: not listed in {large_files}")
    if url_override and len(entries) > 1:
        raise WeightsError("--url_override needs --path: it would apply to several files")
    done = {}
    for entry in entries:
        done[entry["path"]] = fetch(entry, bundle_root, url_override, timeout)
        print(f"{entry['path']}: {done[entry['path']]} (sha256 verified)")
    return done


def hash_file(path: str) -> str:
    """Prints and returns the sha256 of ``path``, the ``hash_val`` to write into large_files.yml."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    value = sha256_of(path)
    print(value)
    return value


def main(argv: list[str] | None = None) -> int:
    import fire

    try:
        fire.Fire({"download": download, "hash": hash_file, "average": average}, command=argv, serialize=lambda _: None)
    except (WeightsError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
