"""Checkpoint averaging: the tensor-wise mean of several checkpoints of one architecture, e.g. the
last epochs of a constant-learning-rate run (as in stochastic weight averaging).

Usage (from the bundle folder)::

    python -m scripts.averaging a.pt b.pt c.pt --out avg.pt

Errors are one line on stderr (exit code 1), naming the file and the problem; then nothing is written.
"""

from __future__ import annotations

import os
import sys

import torch

from scripts.files import atomic_path, check_output_dir
from scripts.weights import CheckpointError, command_line, read_state_dict

__all__ = ["average"]


def average(*paths: str, out: str) -> str:
    """Writes to ``out`` the plain state dict whose every tensor is the mean of that tensor over
    ``paths`` (plain state dicts or resumable checkpoints; ``module.`` prefixes of DDP runs removed).
    All files must hold the same tensors with the same shapes; a file that does not is named in the
    error and nothing is written. ``out`` is written under a temporary name and renamed when complete,
    with the umask's permissions. Returns ``out``.

    The networks here have no batch-norm running statistics (instance norm without them), so the
    averaged weights need no recalibration pass."""
    paths = tuple(str(p) for p in paths)  # fire turns a path such as 40 into an int
    out = str(out)
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    if os.path.isdir(out):
        raise CheckpointError(f"--out {out} is a folder; give the file to write")
    check_output_dir(os.path.dirname(os.path.abspath(out)))  # before reading any checkpoint
    states = [read_state_dict(p) for p in paths]
    ref = states[0]
    for p, state in zip(paths[1:], states[1:], strict=True):
        if set(state) != set(ref) or any(state[k].shape != ref[k].shape for k in ref):
            raise CheckpointError(
                f"{p}: holds other tensors or shapes than {paths[0]}; "
                "only checkpoints of one architecture can be averaged"
            )
    for k, v in ref.items():
        for p, state in zip(paths[1:], states[1:], strict=True):
            if not v.is_floating_point() and not torch.equal(state[k], v):
                raise CheckpointError(f"{p}: its non-float tensor {k} differs from {paths[0]}'s and cannot be averaged")
    # Summed in float64 so that the mean of many float32 / float16 checkpoints does not lose precision.
    mean = {
        k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
        for k, v in ref.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(mean, tmp)
    print(f"{out}: mean of {len(paths)} checkpoints")
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); errors are one line on stderr and exit code 1."""
    return command_line(average, argv)


if __name__ == "__main__":
    sys.exit(main())
