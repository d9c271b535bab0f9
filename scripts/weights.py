"""The bundle's weight files: verified downloads of the files listed in ``large_files.yml``, and safe
checkpoint loading (``torch.load(..., weights_only=True)`` with errors that name the file and the problem).

Usage (from the bundle folder)::

    python -m scripts.weights download                          # every entry of large_files.yml
    python -m scripts.weights download --path models/model.pt   # one entry
    python -m scripts.weights download --path models/model.pt --url_override https://mirror/model.pt
    python -m scripts.weights download --max_seconds 600 --max_bytes 500000000   # limits (see download)
    python -m scripts.weights hash models/model.pt              # the sha256 to put in large_files.yml

Checkpoint averaging is ``python -m scripts.averaging`` (scripts/averaging.py).

Downloads: every selected entry must give a sha256 ``hash_val`` (checked for all of them before anything
is downloaded: nothing is ever installed unverified). Each file is streamed to a temporary file next to
its destination (``models/.tmp-<pid>-...``), its sha256 compared with ``hash_val``, and only then renamed
to its final name with the umask's permissions, so a failed, interrupted or tampered download never
leaves a file (or replaces a good one) under the final name. A file already present with the right hash
is not downloaded again. A download is stopped when it takes longer than ``max_seconds`` in all or
exceeds ``max_bytes`` (refused before the body is read when the server announces a larger
Content-Length); the temporary files that killed downloads left behind are removed first.

MONAI's own ``python -m monai.bundle download_large_files --bundle_path .`` reads the same file (keep its
entries to ``path``, ``url``, ``hash_val``, ``hash_type``: MONAI passes every key to ``download_url``),
but see docs/tooling.md for what it does not guarantee.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from typing import BinaryIO

import torch
import yaml
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader

from scripts.files import atomic_path, check_output_dir, remove_stale, sha256_of

__all__ = [
    "CheckpointError",
    "CheckpointLoader",
    "MAX_BYTES",
    "MAX_SECONDS",
    "WeightsError",
    "check_checkpoint",
    "command_line",
    "download",
    "fetch",
    "hash_file",
    "load_pretrained",
    "read_large_files",
    "read_state_dict",
    "sha256_of",
]

CHUNK = 1 << 20
SUPPORTED_HASH = "sha256"
MAX_BYTES = 2 << 30  # 2 GiB: far above any weight file of this bundle, far below a disk-filling stream
MAX_SECONDS = 3600.0
# torch.save's legacy (non-zip) format starts with its magic number pickled with protocol 2.
_LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]


class WeightsError(RuntimeError):
    """A weight file that cannot be fetched or verified; the message names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# Checkpoint loading


def _not_a_checkpoint(path: str) -> str | None:
    """Why ``path`` is not a checkpoint written by ``torch.save`` at all, judged from its container (a zip
    archive with a ``data.pkl``, or the legacy format's header); None when it looks like one."""
    if os.path.getsize(path) == 0:
        return "not a PyTorch checkpoint: the file is empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"not a PyTorch checkpoint: a corrupt zip archive ({e})"
        if any(n.endswith("/constants.pkl") for n in names):
            return "a TorchScript export (model.ts), not a checkpoint: give the .pt file it was exported from"
        if not any(n.endswith("data.pkl") for n in names):
            return "not a PyTorch checkpoint: a zip archive that torch.save did not write"
        return None
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEADER))
    if head.startswith(b"PK"):
        return "not a PyTorch checkpoint: a truncated or corrupt zip archive (an interrupted write or download?)"
    if head != _LEGACY_HEADER:
        return (
            "not a PyTorch checkpoint: neither the zip archive nor the legacy file that torch.save writes "
            "(random bytes, text, another format?)"
        )
    return None


def _load_error(path: str, error: BaseException) -> CheckpointError:
    """The one-line ``CheckpointError`` for ``error``, raised while loading the checkpoint ``path``.

    torch's own messages do not say which file it was, and ``weights_only=True`` reports random bytes
    and pickled Python objects alike as "Weights only load failed": the file's container tells them apart.
    """
    if not os.path.exists(path):
        return CheckpointError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        return CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        why = _not_a_checkpoint(path)
    except OSError as e:
        return CheckpointError(f"{path}: cannot read this checkpoint: {e}")
    if why:
        return CheckpointError(f"{path}: {why}")
    message = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if isinstance(error, pickle.UnpicklingError) and refused:
        return CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): the file holds pickled Python objects, not only "
            f"tensors (it needs {refused.group(1)}); save a plain state dict: torch.save(model.state_dict(), path)"
        )
    # e.g. the size-mismatch lines of strict loading, or a zip archive with damaged members
    return CheckpointError(f"{path}: cannot load this checkpoint: {' '.join(message.split())}")


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``torch.load(..., weights_only=True)``, strict by default) whose
    errors are one ``CheckpointError`` line naming the checkpoint file and the problem: not found, not
    a PyTorch checkpoint at all, pickled Python objects refused, or the loading error (e.g. the
    ``size mismatch`` lines of a checkpoint of another architecture). The original error is the cause.
    An empty ``load_path`` loads nothing (a network that comes with its weights, e.g. a TorchScript
    export given as ``--network_def``, runs with ``--ckpt_path ""``).
    """

    def attach(self, engine) -> None:
        if self.load_path:
            super().attach(engine)

    def __call__(self, engine) -> None:
        try:
            super().__call__(engine)
        except Exception as e:
            raise _load_error(self.load_path, e) from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The network weights stored in ``path``: a plain state dict, or the ``model`` entry of a
    resumable checkpoint; ``module.`` prefixes (DistributedDataParallel) removed. Raises
    ``CheckpointError`` naming the file if it is missing, not a PyTorch checkpoint, holds pickled
    Python objects or holds no state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _load_error(path, e) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def check_checkpoint(
    path: str, train_config: str = "configs/train.json", option: str = "--ckpt_path", docs: str = "docs/README.md"
) -> str:
    """Refuses, in one line naming the file, a checkpoint the run could not load, before any work is
    done (for a config's ``initialize``): missing (saying how to get one: ``train_config`` is the
    config, or the command, that trains it, described in ``docs``; ``option`` the command-line key that
    names the file), not a PyTorch checkpoint, holding pickled Python objects, or holding no state dict.
    Returns ``path``.

    Whether its tensors fit the configured network is checked when it is loaded (strict loading)."""
    if not os.path.exists(path):
        how = (
            f"{train_config} with the same config files as this run" if train_config.endswith(".json") else train_config
        )
        raise CheckpointError(
            f"{path}: checkpoint not found. Train one ({how}, see {docs}), fetch it with "
            f"python -m scripts.weights download if large_files.yml lists it, or pass {option} <file>"
        )
    read_state_dict(path)
    return path


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
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the network"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
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


def checkpoint_list(paths: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """A list of checkpoint paths from a command-line value: one path, a list of paths, or nothing
    (``--ensemble_ckpts runs/a.pt`` reaches the config as a string, not as a list of its characters)."""
    if not paths:
        return []
    return [paths] if isinstance(paths, str) else [str(p) for p in paths]


def load_copies(network: torch.nn.Module, paths: str | list[str] | tuple[str, ...] | None) -> list[torch.nn.Module]:
    """Copies of ``network`` (same architecture, device and memory format), one per checkpoint in
    ``paths``, each loaded with ``load_pretrained`` (an error names a file of another architecture):
    the members of an ensemble (inference.json ``ensemble_ckpts``)."""
    return [load_pretrained(copy.deepcopy(network), p) for p in checkpoint_list(paths)]


# --------------------------------------------------------------------------------------------------
# Verified downloads


def read_large_files(bundle_root: str = ".", large_files: str = "large_files.yml") -> list[dict]:
    """The entries of ``large_files.yml`` (relative to ``bundle_root``), each checked for
    ``path`` and ``url``, with a path inside the bundle."""
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


class _Refused(Exception):
    """A download stopped by ``_transfer`` itself (size cap, short body); the message says why."""


def _transfer(url: str, out: BinaryIO, timeout: float, max_bytes: int, stop: threading.Event, state: dict) -> None:
    """Writes the body of ``url`` into the open file ``out``: ``state["sha256"]`` when complete, else
    the exception in ``state["error"]``; ``state["size"]`` counts the bytes received. Ends without
    writing more once ``stop`` is set."""
    digest = hashlib.sha256()
    state["size"] = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            try:
                announced = int(response.headers.get("Content-Length"))
            except (TypeError, ValueError):  # absent (chunked or close-delimited body) or malformed
                announced = None
            if announced is not None and announced > max_bytes:
                raise _Refused(f"refused: the server announces {announced} bytes, more than --max_bytes {max_bytes}")
            # read1: at most one system call per block, so that stop is seen after every few bytes.
            while not stop.is_set() and (block := response.read1(CHUNK)):
                state["size"] += len(block)
                if state["size"] > max_bytes:
                    raise _Refused(f"stopped: more than --max_bytes {max_bytes} bytes")
                digest.update(block)
                out.write(block)
            if announced is not None and state["size"] != announced and not stop.is_set():
                raise _Refused(f"incomplete: the connection closed after {state['size']} of {announced} bytes")
        state["sha256"] = digest.hexdigest()
    except Exception as e:
        state["error"] = e


def _stream(url: str, name: str, tmp: str, timeout: float, max_seconds: float, max_bytes: int) -> str:
    """Writes the body of ``url`` into the file ``tmp`` within ``max_seconds`` and returns its sha256.
    Every error is a ``WeightsError`` naming ``name`` (the entry's path) and the URL.

    MONAI's ``monai.apps.utils.download_url`` is not used for the transfer: it calls ``urlretrieve``
    without any timeout (a stalled server blocks it forever) and has no size cap, so it can give
    neither the deadline nor ``max_bytes``; it also downloads into the system temporary folder (where
    ``remove_stale`` cannot find what a killed run left) and moves the file with ``shutil.move`` (a
    copy, not an atomic rename, across file systems).
    """

    def failed(problem: str) -> WeightsError:
        return WeightsError(f"{name}: download of {url} {problem}")

    state: dict = {}
    stop = threading.Event()
    # The transfer runs in a worker thread so that the deadline holds in every phase: the socket
    # timeout applies per read, and a server trickling its bytes (or its response headers, on which
    # urlopen blocks) would never trigger it. At the deadline the worker is abandoned; it stops at its
    # next read or socket timeout without writing anything more. The file is opened (and closed) here,
    # so that an abandoned worker can never create it again once atomic_path has removed it.
    with open(tmp, "wb") as out:
        worker = threading.Thread(target=_transfer, args=(url, out, timeout, max_bytes, stop, state), daemon=True)
        worker.start()
        worker.join(max_seconds)
        if worker.is_alive():
            stop.set()
            received = state.get("size", 0)
            raise failed(f"stopped: not complete after --max_seconds {max_seconds:g} ({received} bytes received)")
    error = state.get("error")
    if isinstance(error, _Refused):
        raise failed(str(error))
    if isinstance(error, urllib.error.HTTPError):
        raise failed(f"failed: HTTP {error.code} {error.reason}") from error
    if isinstance(error, TimeoutError):
        raise failed(f"failed: no data for --timeout {timeout:g} seconds") from error
    if error is not None:  # URLError, http.client.HTTPException, OSError, ValueError (a malformed URL)
        raise failed(f"failed: {error}") from error
    return state["sha256"]


def fetch(
    entry: dict,
    bundle_root: str = ".",
    url: str | None = None,
    timeout: float = 60.0,
    max_seconds: float = MAX_SECONDS,
    max_bytes: int = MAX_BYTES,
) -> str:
    """Makes ``entry['path']`` (under ``bundle_root``) a verified copy of ``url`` (default: ``entry['url']``).

    Returns "present" when the file already had the right hash, "downloaded" otherwise. Raises
    ``WeightsError`` (naming the file, the URL and, on a mismatch, the expected and actual hashes)
    on an HTTP / network error, a download longer than ``max_seconds`` or larger than ``max_bytes``,
    or a hash mismatch; then nothing is written and a file already at the destination is left as it
    was. Temporary files of killed downloads in the destination folder are removed first.
    """
    expected = _expected_hash(entry)
    dest = os.path.join(bundle_root, entry["path"])
    url = url or entry["url"]
    if os.path.isdir(dest):
        raise WeightsError(f"{entry['path']}: {dest} is a folder")
    if os.path.isfile(dest) and sha256_of(dest) == expected:
        return "present"
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        check_output_dir(folder)
    except OSError as e:
        raise WeightsError(f"{entry['path']}: {e}") from e
    os.makedirs(folder, exist_ok=True)
    remove_stale(folder)
    with atomic_path(dest) as tmp:
        actual = _stream(url, entry["path"], tmp, timeout, max_seconds, max_bytes)
        if actual != expected:
            raise WeightsError(
                f"{entry['path']}: sha256 of the file downloaded from {url} does not match large_files.yml: "
                f"expected {expected}, got {actual}; nothing was written"
            )
    return "downloaded"


def download(
    path: str | None = None,
    url_override: str | None = None,
    bundle_root: str = ".",
    large_files: str = "large_files.yml",
    timeout: float = 60.0,
    max_seconds: float = MAX_SECONDS,
    max_bytes: int = MAX_BYTES,
) -> dict[str, str]:
    """Fetches every entry of ``large_files.yml`` (or the one whose ``path`` is ``path``).

    Args:
        path: only this entry (as written in large_files.yml, e.g. ``models/model.pt``).
        url_override: download from this URL instead (a mirror); the hash is still the one in
            large_files.yml. Needs ``path`` when the file lists several entries.
        bundle_root: the bundle folder; paths in large_files.yml are relative to it.
        large_files: the index file, relative to ``bundle_root``.
        timeout: seconds without data before giving up.
        max_seconds: seconds one file's download may take in all (checked after every read, so it
            ends at most ``timeout`` seconds later).
        max_bytes: the largest file accepted.

    Every selected entry's hash is checked before anything is downloaded. Returns
    {path: "present" | "downloaded"}.
    """
    entries = read_large_files(bundle_root, large_files)
    if path is not None:
        wanted = os.path.normpath(path)
        entries = [e for e in entries if os.path.normpath(e["path"]) == wanted]
        if not entries:
            raise WeightsError(f"{path}: not listed in {large_files}")
    if url_override and len(entries) > 1:
        raise WeightsError("--url_override needs --path: it would apply to several files")
    for option, value in (("timeout", timeout), ("max_seconds", max_seconds), ("max_bytes", max_bytes)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise WeightsError(f"--{option} must be a positive number, got {value!r}")
    for entry in entries:
        _expected_hash(entry)
    done = {}
    for entry in entries:
        done[entry["path"]] = fetch(entry, bundle_root, url_override, timeout, max_seconds, int(max_bytes))
        print(f"{entry['path']}: {done[entry['path']]} (sha256 verified)")
    return done


def hash_file(path: str) -> str:
    """Prints and returns the sha256 of ``path``, the ``hash_val`` to write into large_files.yml."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    value = sha256_of(path)
    print(value)
    return value


def command_line(component, argv: list[str] | None = None) -> int:
    """Runs ``component`` (a function, or a dict of them for subcommands) as a ``fire`` command line
    with ``argv`` (default ``sys.argv[1:]``): a weight-file, checkpoint or file-system error is one line
    on stderr and exit code 1, without a traceback; 0 otherwise."""
    import fire

    try:
        fire.Fire(component, command=argv, serialize=lambda _: None)
    except (WeightsError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); errors are one line on stderr and exit code 1."""
    return command_line({"download": download, "hash": hash_file}, argv)


if __name__ == "__main__":
    sys.exit(main())
