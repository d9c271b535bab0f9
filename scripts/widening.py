"""Function-preserving widening (Net2WiderNet, Chen et al., ICLR 2016): the weights of a
``SpatialGradientRegNet`` copied into one whose every level has ``f`` times the channels, such that
the wider network predicts the same deformation before any training. A wider run (e.g. width 16 on a
GPU) then starts from the shipped width-8 weights instead of from scratch.

Usage (from the bundle folder)::

    python -m scripts.widening models/model.pt --out runs/w16/widened.pt \\
        --channels "[16, 32, 64, 128, 256]" --deep_supervision True

then train with ``--channels "[16, 32, 64, 128, 256]" --deep_supervision True --pretrained_ckpt
runs/w16/widened.pt``. The architecture (activation, norm, convolutions per block) is the one of
``--config_file``'s ``network_def``; the narrow network's channels are the wide ones divided by ``f``,
read from the checkpoint. Before writing, the widened network is checked against the original on a
test input (largest displacement difference below ``tolerance`` voxels); errors are one line on
stderr (exit code 1) naming the file and the problem, and then nothing is written.

How: every feature channel ``c`` of the wide network is a copy of channel ``c // f`` of the narrow one
(each tensor's channels repeated, also across the skip concatenations, whose parts are widened by the
same ``f``). A convolution's weights for its ``f`` copies of one input channel are split in random
shares ``1/f + noise`` that sum to 1, so the sum over the copies is the original weight (the function
is preserved) while the copies receive different gradients (training can make them differ). Instance
norm sees identical statistics in each copy; image inputs and the 3 gradient channels are not widened.
New deep-supervision heads keep their zero initialisation (they do not change the final output).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from scripts.files import atomic_path, check_output_dir
from scripts.weights import CheckpointError, command_line, read_state_dict

__all__ = ["widen_state_dict", "widen"]


def _factor(narrow: dict[str, torch.Tensor], wide: dict[str, torch.Tensor]) -> int:
    """The one channel factor f relating the two state dicts (every dimension is equal or f times)."""
    factors = set()
    for k, v in narrow.items():
        if k not in wide:
            continue
        if v.ndim != wide[k].ndim:
            raise ValueError(f"{k}: {v.ndim}-D in the checkpoint, {wide[k].ndim}-D in the wider network")
        for a, b in zip(v.shape, wide[k].shape, strict=True):
            if b % a or b < a:
                raise ValueError(f"{k}: shape {tuple(v.shape)} cannot be widened to {tuple(wide[k].shape)}")
            if b != a:
                factors.add(b // a)
    if len(factors) > 1:
        raise ValueError(f"the channels grow by different factors {sorted(factors)}; widening needs one factor f")
    return factors.pop() if factors else 1


def _split_shares(shape: tuple[int, ...], dim: int, f: int, noise: float, generator: torch.Generator):
    """Random shares over groups of ``f`` consecutive indices along ``dim`` that sum to exactly 1 per group."""
    groups = list(shape)
    groups[dim] //= f
    r = torch.rand(*groups[: dim + 1], f, *groups[dim + 1 :], generator=generator, dtype=torch.float64) * 2 - 1
    r = r * noise
    r = r - r.mean(dim=dim + 1, keepdim=True) + 1.0 / f
    return r.flatten(dim, dim + 1)


def widen_state_dict(
    narrow: dict[str, torch.Tensor], wide_network: nn.Module, noise: float = 0.1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The state dict of ``wide_network`` computing the same function as the ``narrow`` state dict.

    Every tensor of ``narrow`` must exist in ``wide_network`` with each dimension equal or ``f`` times
    larger (one ``f`` for the whole network); the wide network's tensors that ``narrow`` lacks must be
    deep-supervision heads (``ds_heads.*``), which keep their initial values. ``noise`` (in (0, 1/f)) is
    the spread of the random shares of a duplicated input channel, so the shares stay positive.
    Raises ``ValueError`` naming the tensor that does not fit.
    """
    wide = wide_network.state_dict()
    f = _factor(narrow, wide)
    if not 0 <= noise < 1.0 / f:
        raise ValueError(f"noise must be in [0, 1/f) = [0, {1.0 / f:g}) so that the shares stay positive, got {noise}")
    extra = [k for k in wide if k not in narrow and not k.startswith("ds_heads.")]
    missing = [k for k in narrow if k not in wide and not k.startswith("ds_heads.")]
    if extra or missing:
        raise ValueError(
            "the checkpoint and the wider network differ in more than width: "
            + (f"the network has {extra[:3]} which the checkpoint lacks; " if extra else "")
            + (f"the checkpoint has {missing[:3]} which the network lacks" if missing else "")
        )
    modules = dict(wide_network.named_modules())
    generator = torch.Generator().manual_seed(int(seed))
    out: dict[str, Any] = {}
    for key, target in wide.items():
        if key not in narrow:
            out[key] = target.clone()
            continue
        v = narrow[key].to(torch.float64) if narrow[key].is_floating_point() else narrow[key]
        module_name, _, param = key.rpartition(".")
        module = modules.get(module_name)
        # (input dim, output dim) of a convolution weight; other tensors are per output channel
        in_dim = None
        if param == "weight" and isinstance(module, nn.modules.conv._ConvNd):
            if module.groups != 1:
                raise ValueError(f"{key}: grouped convolutions cannot be widened")
            in_dim = 0 if module.transposed else 1
        for dim, (a, b) in enumerate(zip(v.shape, target.shape, strict=True)):
            if a == b:
                continue
            v = v.repeat_interleave(b // a, dim=dim)
            if dim == in_dim:
                v = v * _split_shares(tuple(v.shape), dim, b // a, noise, generator)
        out[key] = v.to(target.dtype) if target.is_floating_point() else v
    return out


def _network(parser, channels: list[int], deep_supervision: bool) -> nn.Module:
    parser["channels"] = list(channels)
    parser["deep_supervision"] = bool(deep_supervision)
    return parser.get_parsed_content("network_def", instantiate=True, lazy=False)


def widen(
    ckpt: str,
    out: str,
    channels: Any,
    deep_supervision: bool = False,
    config_file: str = "configs/inference.json",
    noise: float = 0.1,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> str:
    """Writes to ``out`` the weights of ``config_file``'s ``network_def`` with ``channels`` (and
    ``deep_supervision``) that compute what the narrower checkpoint ``ckpt`` computes; see the module
    docstring. Returns ``out``."""
    from monai.bundle import ConfigParser

    ckpt, out = str(ckpt), str(out)
    if isinstance(channels, str):
        import json

        channels = json.loads(channels)
    channels = [int(c) for c in channels]
    if os.path.isdir(out):
        raise CheckpointError(f"--out {out} is a folder; give the file to write")
    check_output_dir(os.path.dirname(os.path.abspath(out)))
    narrow = read_state_dict(ckpt)
    parser = ConfigParser()
    parser.read_config(config_file)
    wide_net = _network(parser, channels, deep_supervision)
    try:
        state = widen_state_dict(narrow, wide_net, noise=noise, seed=seed)
    except ValueError as e:
        raise CheckpointError(f"{ckpt}: {e}") from e
    first = next(k for k in narrow if k.endswith("in_conv1.conv.weight"))
    f = channels[0] // narrow[first].shape[0]
    narrow_net = _network(ConfigParser(parser.get()), [c // f for c in channels], any("ds_heads" in k for k in narrow))
    try:
        narrow_net.load_state_dict(narrow)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt}: does not fit {config_file}'s network at channels {[c // f for c in channels]}: "
            f"{' '.join(str(e).split())[:300]}"
        ) from e
    wide_net.load_state_dict(state)
    # The check: a smooth random pair, eval mode (the final displacement field).
    g = torch.Generator().manual_seed(1)
    size = [narrow_net.divisor * 2] * 3
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 2 * narrow_net.in_channels, *size, generator=g), 3, 1, 1)
    with torch.no_grad():
        a, b = narrow_net.eval()(image), wide_net.eval()(image)
    diff = (a - b).abs().max().item()
    if diff > tolerance:
        raise CheckpointError(
            f"{ckpt}: the widened network is not equivalent (largest displacement difference {diff:.2g} voxels "
            f"> {tolerance}); is the architecture one that widening preserves?"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    print(f"{out}: {ckpt} widened x{f} to channels {channels}; largest displacement difference {diff:.2g} voxels")
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); errors are one line on stderr and exit code 1."""
    return command_line(widen, argv)


if __name__ == "__main__":
    sys.exit(main())
