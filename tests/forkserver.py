"""Command lines for the tests, started from a fork server.

Starting Python and importing torch and MONAI takes 6-10 s on the CI's 2 cores, and about 90 tests run 114
command lines (``python -m monai.bundle run ...``, ``python -m scripts.X``); most of them check a refusal
that takes a fraction of a second once the imports are done. :func:`run` takes ``subprocess.run``'s
arguments and, for ``python -m MODULE ...`` and ``python SCRIPT.py ...``, forks the command from a server
process that has already imported the third-party packages (never the bundle's own ``scripts``, so each
command imports the bundle from its own working directory, as a fresh ``python -m`` does).

What a test can observe is what a fresh process gives: its own process (memory, pid, exit status; a kill
on timeout), its working directory, environment, umask, stdin from /dev/null, stdout and stderr, the module
run as ``__main__`` by runpy as ``python -m`` runs it, an uncaught exception printed with its traceback and
exit status 1, non-daemon threads joined and ``atexit`` run before it exits, fresh random seeds. Variables
read while Python and its libraries start (``PYTHON*``, ``OMP_*``, ``MKL_*``, ``OPENBLAS_*``) are the
server's: a command whose values differ gets a server of its own. Any other command line (``bash``,
another interpreter) runs as a plain subprocess, and so does every command with
``BUNDLE_TESTS_FRESH_PROCESS=1`` (the slow, fully fresh way, to rule the server out).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# Imported once by the server; the bundle's commands import them anyway (not the __main__ modules
# themselves: runpy runs those).
PRELOAD = (
    "numpy",
    "scipy.ndimage",
    "torch",
    "monai",
    "monai.bundle",
    "monai.transforms",
    "monai.networks",
    "monai.losses",
    "monai.metrics",
    "monai.data",
    "monai.inferers",
    "monai.handlers",
    "ignite.engine",
    "ignite.handlers",
    "ignite.metrics",
    "nibabel",
    "fire",
    "itk",
    "torch.utils.tensorboard",
)
STARTUP_TIMEOUT = 600  # seconds for a new server to import PRELOAD and fork
STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_")

_servers: dict[tuple, _Server] = {}
_lock = threading.Lock()


def _startup_vars(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_PREFIXES)))


class _Server:
    """One server process; commands are sent one at a time."""

    def __init__(self, env: dict) -> None:
        ours, theirs = socket.socketpair()
        self.log = tempfile.NamedTemporaryFile(prefix="forkserver-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        theirs.close()
        self.sock = ours
        self.received = b""
        self.lock = threading.Lock()

    def reply(self, timeout: float | None = None) -> dict:
        """The server's next reply line; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.received:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], wait)[0]:
                raise TimeoutError
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                self.log.flush()
                with open(self.log.name, errors="replace") as f:
                    log = f.read()[-5000:]
                raise RuntimeError(f"the tests' fork server stopped; its log ({self.log.name}):\n{log}")
            self.received += chunk
        line, self.received = self.received.split(b"\n", 1)
        return json.loads(line)

    def run(self, request: dict, timeout: float | None) -> tuple[int, bool]:
        """(returncode, timed out)"""
        with self.lock:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            pid = self.reply(STARTUP_TIMEOUT)["pid"]  # the first command waits for the imports
            try:
                return self.reply(timeout)["returncode"], False
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                return self.reply()["returncode"], True

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=30)
        os.unlink(self.log.name)


def _close_all() -> None:
    for server in _servers.values():
        try:
            server.close()
        except Exception:  # noqa: S110 (the test session is over; a server that is already gone is fine)
            pass


def _entry(cmd: list[str]) -> list[str] | None:
    """``cmd`` after the interpreter, when the server can run it: ``python -m MODULE ...`` or ``python FILE ...``."""
    # the same path, not the same file: a virtual environment's python is a link to the base interpreter
    if len(cmd) < 2 or os.path.abspath(cmd[0]) != os.path.abspath(sys.executable):
        return None
    if cmd[1] == "-m" and len(cmd) > 2:
        return cmd[1:]
    if not cmd[1].startswith("-") and cmd[1].endswith(".py"):
        return cmd[1:]
    return None


def run(
    cmd,
    *,
    cwd=None,
    env: dict | None = None,
    timeout: float | None = None,
    umask: int = -1,
    check: bool = False,
    capture_output: bool = True,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=, env=, timeout=, umask=, check=, capture_output=True, text=)``, forked
    from a server where it can be (module docstring)."""
    cmd = [os.fspath(c) for c in cmd]
    assert capture_output, "the fork server always captures stdout and stderr"
    entry = _entry(cmd)
    env = dict(os.environ if env is None else env)
    if entry is None or os.environ.get("BUNDLE_TESTS_FRESH_PROCESS") == "1":
        return subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, umask=umask, check=check, capture_output=True,
                              text=text)  # fmt: skip
    key = _startup_vars(env)
    with _lock:
        if not _servers:
            import atexit

            atexit.register(_close_all)
        if key not in _servers:
            _servers[key] = _Server(env)
        server = _servers[key]
    with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        request = {
            "entry": entry,
            "cwd": os.path.abspath(cwd or os.getcwd()),
            "env": env,
            "umask": umask,
            "stdout": out,
            "stderr": err,
        }
        returncode, timed_out = server.run(request, timeout)
        outputs = []
        for path in (out, err):
            with open(path, "rb") as f:
                data = f.read()
            outputs.append(data.decode(errors="replace") if text else data)
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=outputs[0], stderr=outputs[1])
    proc = subprocess.CompletedProcess(cmd, returncode, *outputs)
    if check:
        proc.check_returncode()
    return proc


# --- the server side -----------------------------------------------------------------------------------------


def _exit_status(code) -> int:
    """The exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(request: dict) -> None:
    """Run one command in the forked process, then exit with its status; never returns."""
    import atexit
    import runpy

    status = 1
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        if request["umask"] >= 0:
            os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        if "numpy" in sys.modules:  # (random reseeds itself after a fork; numpy's global generator does not)
            sys.modules["numpy"].random.seed()
        entry = request["entry"]
        try:
            if entry[0] == "-m":
                sys.argv = [entry[1], *entry[2:]]  # runpy puts the module's file in sys.argv[0]
                sys.path[0] = request["cwd"]
                runpy.run_module(entry[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(entry)
                sys.path[0] = os.path.dirname(os.path.abspath(entry[0]))
                runpy.run_path(entry[0], run_name="__main__")
            status = 0
        except SystemExit as e:
            status = _exit_status(e.code)
        except BaseException:  # noqa: B036 (as the interpreter does with an uncaught exception)
            sys.excepthook(*sys.exc_info())
            status = 1
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: S110 (a closed stream has nothing left to write)
                pass
        os._exit(status)


def _serve(fd: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    sock = socket.socket(fileno=fd)
    requests = sock.makefile("rb")
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            sock.close()
            _child(request)
        sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        sock.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
