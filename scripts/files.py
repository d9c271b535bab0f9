"""Writing outputs safely: one helper per concern, used by every command of the bundle.

- Nothing half-written under a final name: a file is written under a temporary name in the same
  folder and renamed when complete (``atomic_path``); a folder of results is written as a whole
  into a staging folder next to it and renamed at the end (``staged_dir``).
- Normal permissions: temporary files and folders are created private (``mkstemp`` / ``mkdtemp``
  style) while being written, and get the umask's mode (0o666 / 0o777 minus the umask) before they
  appear under their final name, like a file written with ``open``.
- Temporary names carry the writing process id, ``.tmp-<pid>-<random>-<name>``, so that the
  leftovers of a killed run can be told from the files of a run still writing:
  ``remove_stale(folder)`` deletes those whose process no longer exists (on this machine).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil

import nibabel as nib
import numpy as np

__all__ = [
    "TMP_PREFIX",
    "atomic_path",
    "check_output_dir",
    "file_mode",
    "publish_dir",
    "remove_stale",
    "save_nifti",
    "sha256_of",
    "staged_dir",
    "staging_path",
    "tmp_name",
]

TMP_PREFIX = ".tmp-"
_TMP = re.compile(r"^\.tmp-(\d+)-")


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(folder: bool = False) -> int:
    """The mode a new file (0o666) or folder (0o777) gets from ``open`` / ``mkdir`` under the umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def tmp_name(name: str) -> str:
    """A temporary name for ``name`` owned by this process: ``.tmp-<pid>-<random>-<name>``."""
    return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: str) -> list[str]:
    """Removes the temporary files and folders that killed runs left in ``folder`` (names
    ``.tmp-<pid>-...`` whose process no longer exists) and returns their paths. The temporary files
    of running processes are left alone. A missing folder holds nothing stale."""
    removed = []
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        match = _TMP.match(name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        removed.append(path)
    return removed


class atomic_path:  # noqa: N801 (used like a function: with atomic_path(p) as tmp)
    """Context manager giving a temporary path next to ``path``; on success the file written there
    gets the umask's mode and is renamed to ``path``; on failure it is removed. No half-written file
    is ever left under the final name. The temporary name keeps the extension (``.nii.gz``,
    ``.png``): writers pick the format from it."""

    def __init__(self, path: str) -> None:
        self.path = path
        folder, name = os.path.split(os.path.abspath(path))
        self.tmp = os.path.join(folder, tmp_name(name))
        # Create it private (O_EXCL: never follow a planted link), widened only once complete.
        os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.chmod(self.tmp, file_mode())
                os.replace(self.tmp, self.path)
            except BaseException:
                if os.path.exists(self.tmp):
                    os.remove(self.tmp)
                raise
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def sha256_of(path: str) -> str:
    """The sha256 of the file ``path``, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Writes ``array`` (raw array axes, no reorientation) with ``affine`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), tmp)


def check_output_dir(output_dir: str, overwrite: bool = True, overwrite_option: str | None = "--overwrite True") -> str:
    """Refuses, naming it, before any work is done, an output folder that cannot be created or
    written into, and (``overwrite=False``) one that already exists and is not empty; the message
    names the command's ``overwrite_option`` if it has one. Creates nothing. Returns ``output_dir``."""
    path = os.path.abspath(output_dir)
    existing = path
    while not os.path.exists(existing):  # also False below a regular file (ENOTDIR)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise NotADirectoryError(f"output folder {output_dir} {what}, not a folder")
    parent = existing if existing != path else os.path.dirname(path)
    if not os.access(parent, os.W_OK | os.X_OK) or (existing == path and not os.access(path, os.W_OK | os.X_OK)):
        raise PermissionError(f"output folder {output_dir}: {parent if existing != path else path} is not writable")
    if not overwrite and existing == path and _visible_entries(path):
        how = (
            f", or pass {overwrite_option} to replace its content once the new results are complete"
            if overwrite_option
            else ""
        )
        raise FileExistsError(f"output folder {output_dir} already exists and is not empty: choose another folder{how}")
    return output_dir


def _visible_entries(folder: str) -> list[str]:
    """The entries of ``folder`` other than temporary ones (``.tmp-*``)."""
    return [n for n in os.listdir(folder) if not n.startswith(TMP_PREFIX)]


def staging_path(output_dir: str) -> str:
    """Where the results for ``output_dir`` are written before ``publish_dir`` moves them there:
    ``<parent>/.tmp-<pid>-<random>-<name>`` (not created here). Stale staging folders of killed
    runs next to it are removed."""
    path = os.path.abspath(output_dir)
    parent = os.path.dirname(path)
    remove_stale(parent)
    return os.path.join(parent, tmp_name(os.path.basename(path)))


def publish_dir(staging: str, output_dir: str, overwrite: bool = False) -> str:
    """Moves the complete folder ``staging`` to ``output_dir`` with the umask's mode.

    ``output_dir`` absent or empty: a rename. Non-empty: refused (``FileExistsError``: another run
    filled it meanwhile) unless ``overwrite``, in which case the old content is moved aside, the new
    folder renamed into place and only then the old content deleted, so that a failure at any point
    leaves one complete set of results, never a mixture. Returns ``output_dir``."""
    os.chmod(staging, file_mode(folder=True))
    path = os.path.abspath(output_dir)
    if os.path.isdir(path) and not _visible_entries(path):
        shutil.rmtree(path)
    if not os.path.exists(path):
        os.rename(staging, path)
        return output_dir
    if not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} was filled by something else during this run; this run's results were discarded"
        )
    old = os.path.join(os.path.dirname(path), tmp_name("old-" + os.path.basename(path)))
    os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return output_dir


class staged_dir:  # noqa: N801 (used like a function: with staged_dir(d) as tmp)
    """Context manager: a staging folder (``staging_path``) to write a whole folder of results into,
    published to ``path`` (``publish_dir``) on success and removed on failure.

    ``path`` must be absent or empty unless ``overwrite`` (checked on entry, before any work;
    ``overwrite_option`` as in ``check_output_dir``)."""

    def __init__(self, path: str, overwrite: bool = False, overwrite_option: str | None = None) -> None:
        check_output_dir(path, overwrite=overwrite, overwrite_option=overwrite_option)
        self.path, self.overwrite = path, overwrite
        self.tmp = staging_path(path)

    def __enter__(self) -> str:
        os.makedirs(os.path.dirname(self.tmp), exist_ok=True)
        os.mkdir(self.tmp, 0o700)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                publish_dir(self.tmp, self.path, self.overwrite)
                return
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)
