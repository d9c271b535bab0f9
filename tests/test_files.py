"""Tests of scripts/files.py: atomic files and folders, normal permissions, stale temporary files."""

import os
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from scripts.files import atomic_path, check_output_dir, publish_dir, remove_stale, save_nifti, staged_dir, tmp_name


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_gets_the_umask_mode(tmp_path, umask_022):
    target = tmp_path / "a.txt"
    with atomic_path(str(target)) as tmp:
        assert mode(tmp) == 0o600  # private while being written
        with open(tmp, "w") as f:
            f.write("x")
        assert not target.exists()
    assert target.read_text() == "x"
    assert mode(target) == 0o644
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_file_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_remove_stale_keeps_the_files_of_live_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = tmp_path / f".tmp-{dead_pid}-abcd-disp.nii.gz"
    stale_dir = tmp_path / f".tmp-{dead_pid}-abcd-eval"
    live = tmp_path / tmp_name("figure.png")  # this process
    other = tmp_path / ".tmp-notapid-x"  # not ours to judge
    for p in (stale_file, live, other):
        p.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "f").write_text("x")
    removed = remove_stale(str(tmp_path))
    assert sorted(removed) == sorted([str(stale_file), str(stale_dir)])
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
    assert remove_stale(str(tmp_path / "missing")) == []


def test_staged_dir_publishes_a_complete_folder(tmp_path, umask_022):
    out = tmp_path / "out"
    with staged_dir(str(out)) as tmp:
        (open(os.path.join(tmp, "f"), "w")).write("x")
        assert not out.exists()
    assert (out / "f").read_text() == "x"
    assert mode(out) == 0o755
    assert os.listdir(tmp_path) == ["out"]


def test_staged_dir_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(FileExistsError, match=f"{out} already exists and is not empty: choose another folder$"):
        staged_dir(str(out))
    with pytest.raises(FileExistsError, match="or pass --overwrite True to replace"):
        check_output_dir(str(out), overwrite=False)
    # a failed overwrite keeps the old results whole
    with pytest.raises(RuntimeError):
        with staged_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new"), "w").write("new")
            raise RuntimeError("killed")
    assert os.listdir(out) == ["old"]
    with staged_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").write("new")
    assert os.listdir(out) == ["new"]
    assert os.listdir(tmp_path) == ["out"]


def test_publish_refuses_a_folder_filled_during_the_run(tmp_path):
    out, staging = tmp_path / "out", tmp_path / "staging"
    staging.mkdir()
    out.mkdir()
    (out / "other_run").write_text("x")
    with pytest.raises(
        FileExistsError, match="filled by something else during this run; this run's results were discarded"
    ):
        publish_dir(str(staging), str(out))
    assert staging.exists() and os.listdir(out) == ["other_run"]


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match="cannot be created"):
        check_output_dir(str(tmp_path / "file" / "sub"))
    assert check_output_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()


def test_save_nifti_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "out.nii.gz"
    save_nifti(np.zeros((4, 4, 4, 3), np.float32), np.eye(4), str(target))
    assert target.exists() and [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    with pytest.raises(RuntimeError):
        with atomic_path(str(tmp_path / "other.png")) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    assert nib.load(str(target)).shape == (4, 4, 4, 3)
