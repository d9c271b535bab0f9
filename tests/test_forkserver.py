"""The tests' fork server (tests/forkserver.py) gives a command what a fresh ``python`` process gives it."""

import json
import os
import subprocess
import sys
import textwrap

import forkserver
import pytest

SCRIPT = textwrap.dedent("""
    import json, os, random, sys
    import numpy as np
    print(json.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "pid": os.getpid(), "name": __name__,
        "env": os.environ.get("FORKSERVER_TEST"), "umask": os.umask(0o022), "random": random.random(),
        "numpy": float(np.random.random()), "scripts": "scripts" in sys.modules, "stdin": sys.stdin.read(),
    }))
    print("to stderr", file=sys.stderr)
    mode = os.environ.get("FORKSERVER_MODE")
    if mode == "exit3":
        sys.exit(3)
    if mode == "message":
        sys.exit("stopped: bad input")
    if mode == "raise":
        raise ValueError("no such file: x.nii.gz")
    if mode == "thread":
        import atexit, threading, time
        atexit.register(lambda: print("atexit ran"))
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    if mode == "sleep":
        import time
        time.sleep(60)
    """)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def probe(script, mode="", **kwargs):
    env = {**os.environ, "FORKSERVER_TEST": "x", "FORKSERVER_MODE": mode}
    return forkserver.run([sys.executable, str(script)], cwd=script.parent, env=env, **kwargs)


def test_a_forked_command_sees_what_a_fresh_process_sees(script, tmp_path):
    a, b = probe(script, umask=0o027), probe(script)
    fresh = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "FORKSERVER_TEST": "x", "FORKSERVER_MODE": ""},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    first, second, reference = (json.loads(p.stdout) for p in (a, b, fresh))
    for p in (a, b):
        assert p.returncode == 0 and p.stderr == "to stderr\n", p.stderr
    for key in ("argv", "cwd", "path0", "name", "env", "scripts", "stdin"):
        assert first[key] == reference[key], key
    assert first["umask"] == 0o027 and second["umask"] == reference["umask"]
    assert first["pid"] != second["pid"] != os.getpid()
    # fresh seeds in each command, as in a new interpreter
    assert first["random"] != second["random"] and first["numpy"] != second["numpy"]


def test_a_module_runs_as_main_from_its_working_directory(tmp_path):
    """``python -m scripts.X`` imports the ``scripts`` of its own working directory, not the project's."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "__init__.py").write_text("")
    (tmp_path / "scripts" / "where.py").write_text(
        "import sys, scripts\nif __name__ == '__main__':\n    print(scripts.__file__, sys.argv[1:])\n"
    )
    proc = forkserver.run([sys.executable, "-m", "scripts.where", "a", "b"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'scripts' / '__init__.py'} ['a', 'b']\n"


@pytest.mark.parametrize(
    "mode, status, stderr",
    [
        ("exit3", 3, "to stderr\n"),
        ("message", 1, "to stderr\nstopped: bad input\n"),
        ("raise", 1, "ValueError: no such file: x.nii.gz\n"),
    ],
)
def test_exit_status_and_uncaught_exceptions(script, mode, status, stderr):
    proc = probe(script, mode)
    assert proc.returncode == status and proc.stderr.endswith(stderr), proc.stderr
    if mode == "raise":
        assert "Traceback (most recent call last)" in proc.stderr


def test_threads_are_joined_and_atexit_runs(script):
    proc = probe(script, "thread")
    assert proc.returncode == 0 and proc.stdout.splitlines()[1:] == ["thread finished", "atexit ran"], proc.stdout


def test_timeout_kills_the_command(script):
    with pytest.raises(subprocess.TimeoutExpired):
        probe(script, "sleep", timeout=3)
    assert probe(script).returncode == 0  # the server goes on


def test_other_command_lines_run_as_plain_subprocesses(tmp_path):
    proc = forkserver.run(["bash", "-c", "umask"], cwd=tmp_path, umask=0o077)
    assert proc.returncode == 0 and proc.stdout == "0077\n"
