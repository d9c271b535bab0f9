"""The release archive of this bundle: the zip the MONAI bundle registry (the Model Zoo) would host.

Usage (from the bundle folder, a git checkout)::

    python -m scripts.release --out dist/     # prints "<sha256>  <zip path>" (the format of sha256sum)

The archive is ``<bundle id>_v<version>.zip`` holding one folder ``<bundle id>/``, as the Model Zoo packs
and names its bundles (``<bundle>_v<version>.zip`` with the bundle folder at its top; the name that
``python -m monai.bundle download --name <bundle id>`` expects). The bundle id is the ``name`` of
``configs/metadata.json`` in lower case with every run of other characters than letters and digits
replaced by ``_`` ("Spatial-gradient registration (Learn2Reg)" -> ``spatial_gradient_registration_learn2reg``),
the snake_case form the Model Zoo uses for its bundle folders.

What goes in: the files that git tracks (``git ls-files``: nothing git-ignored, no ``.venv``, ``runs/``,
``eval/``, ``__pycache__``) under ``INCLUDE``, read from the working tree, weights included: like a Model
Zoo archive, which holds the large files themselves and not ``large_files.yml`` (its CI downloads them
into the bundle and deletes that index before zipping). Left out: the repository's own tooling (tests,
CI, benchmarks, development requirements). A weight file whose sha256 differs from its ``hash_val`` in
``large_files.yml`` is refused. Files of the included folders that differ from the last commit or are not
tracked are reported on stderr: build a release from a clean checkout.

The zip is reproducible: entries sorted by path, no folder entries, every entry dated 2022-05-30 00:00
(the date the Model Zoo's packing gives every file), Unix permissions taken from git (0644, or 0755 for
executables), stored without compression (zlib's output may change between zlib builds; the archive's
bytes then would too). The same files give the same sha256.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

from scripts.files import atomic_path, sha256_of
from scripts.weights import WeightsError, read_large_files

__all__ = ["DATE_TIME", "INCLUDE", "REQUIRED", "ReleaseError", "build", "bundle_id", "release_files"]

# Top-level files and folders of the bundle that a release carries (see the module docstring).
INCLUDE = (
    "LICENSE",
    "README.md",
    "requirements.txt",
    "constraints.txt",
    "apps",
    "configs",
    "docs",
    "models",
    "sample_data",
    "scripts",
)
# What the Model Zoo's CI requires (LICENSE, metadata.json) or prefers (the inference config, the weights).
REQUIRED = ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt")
DATE_TIME = (2022, 5, 30, 0, 0, 0)
METADATA = os.path.join("configs", "metadata.json")


class ReleaseError(RuntimeError):
    """A release that cannot be built; the message names the file and the problem."""


def bundle_id(name: str) -> str:
    """The bundle's folder and archive name for the display name ``name`` of metadata.json (see the
    module docstring)."""
    ident = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not ident:
        raise ReleaseError(f"{METADATA}: name {name!r} gives no bundle id (it needs letters or digits)")
    return ident


def _git(bundle_root: str, *args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=bundle_root, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ReleaseError("git not found: a release is built from a git checkout of the bundle") from e
    if proc.returncode != 0:
        raise ReleaseError(f"{bundle_root}: git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def release_files(bundle_root: str = ".") -> dict[str, int]:
    """{path: Unix permissions} of the files a release of ``bundle_root`` holds, sorted by path: those
    git tracks under ``INCLUDE``. Raises ``ReleaseError`` naming the path when one of ``REQUIRED`` is not
    tracked, or a tracked file is missing from the working tree or is not a regular file."""
    files = {}
    for line in _git(bundle_root, "ls-files", "-s", "-z", "--", *INCLUDE).split("\0"):
        if line:
            info, path = line.split("\t", 1)
            files[path] = 0o755 if info.split()[0] == "100755" else 0o644
    for path in REQUIRED:
        if path not in files:
            raise ReleaseError(f"{path}: needed by a bundle, not tracked by git in {os.path.abspath(bundle_root)}")
    for path in files:
        full = os.path.join(bundle_root, path)
        if os.path.islink(full) or not os.path.isfile(full):
            raise ReleaseError(f"{path}: tracked by git but not a regular file in the working tree")
    return dict(sorted(files.items()))


def _check_large_files(bundle_root: str, files: dict[str, int]) -> None:
    """Refuses a file of the release whose sha256 differs from its ``hash_val`` in large_files.yml."""
    if not os.path.isfile(os.path.join(bundle_root, "large_files.yml")):
        return
    try:
        entries = read_large_files(bundle_root)
    except WeightsError as e:
        raise ReleaseError(str(e)) from e
    for entry in entries:
        path, expected = os.path.normpath(entry["path"]), str(entry.get("hash_val") or "").strip().lower()
        if path in files and expected:
            actual = sha256_of(os.path.join(bundle_root, path))
            if actual != expected:
                raise ReleaseError(
                    f"{path}: sha256 {actual} differs from its hash_val {expected} in large_files.yml: "
                    "update one of them before releasing"
                )


def _warn_uncommitted(bundle_root: str) -> None:
    status = _git(bundle_root, "status", "--porcelain", "--untracked-files=all", "--", *INCLUDE)
    changed = [line[3:] for line in status.splitlines()]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        print(
            f"warning: {len(changed)} files of the release differ from the last commit or are not tracked "
            f"(untracked ones are left out): {shown}",
            file=sys.stderr,
        )


def build(out: str = "dist", bundle_root: str = ".") -> tuple[str, str]:
    """Writes the release archive of ``bundle_root`` into the folder ``out`` (created if needed) and
    returns (its path, its sha256). The archive is written under a temporary name and renamed when
    complete. Raises ``ReleaseError`` naming the file on an unreadable metadata.json, a version missing
    from its changelog, and the problems ``release_files`` and large_files.yml checks find."""
    meta_path = os.path.join(bundle_root, METADATA)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        name, version = meta["name"], meta["version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReleaseError(f"{meta_path}: needs readable JSON with 'name' and 'version' ({e!r})") from e
    if version not in meta.get("changelog", {}):
        raise ReleaseError(f"{meta_path}: version {version} has no entry in 'changelog'")
    ident = bundle_id(name)
    files = release_files(bundle_root)
    _check_large_files(bundle_root, files)
    _warn_uncommitted(bundle_root)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{ident}_v{version}.zip")
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for rel, mode in files.items():
            info = zipfile.ZipInfo(f"{ident}/{rel}", date_time=DATE_TIME)
            info.create_system = 3  # Unix, whatever the platform that builds it
            info.external_attr = (0o100000 | mode) << 16
            with open(os.path.join(bundle_root, rel), "rb") as src:
                archive.writestr(info, src.read())
    return path, sha256_of(path)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); errors are one line on stderr and exit code 1."""
    import fire

    def release(out: str = "dist", bundle_root: str = ".") -> None:
        path, digest = build(out, bundle_root)
        print(f"{digest}  {path}")

    try:
        fire.Fire(release, command=argv, serialize=lambda _: None)
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
