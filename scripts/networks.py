"""Siamese 3D U-Net that predicts the spatial gradient of a deformation (Estienne et al., 2020).

One encoder sees both images; the encodings are subtracted level by level, so the skips carry
differences; one decoder turns the differences into the spatial gradient ``g`` of the sampling
coordinates. Swapping the images negates every merged feature map, which is how the same weights
serve the moving->fixed and the fixed->moving directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from scripts.deformation import gradient_to_ddf

__all__ = ["OneDNNConv3d", "SiameseEncoder", "GradientDecoder", "SpatialGradientRegNet", "logits_to_gradient"]


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes PyTorch's oneDNN (MKLDNN) kernel for float32 CPU input.

    The same convolution by another kernel (float32 rounding differs, ~1e-6 relative). For a 3D input
    of batch 1 PyTorch picks its native vol2col kernel whenever B * C * H * W <= 20480 (a heuristic
    that ignores the depth axis): at inference, every decoder convolution of this network below full
    resolution, 3 to 7 times slower there than oneDNN on a 2-core CPU. Elsewhere (CUDA, other dtypes,
    under an autocast, oneDNN disabled or missing, TorchScript scripting or tracing) this is
    ``nn.Conv3d``, so exported models hold standard convolutions.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the standard path
            if _onednn_applies(x, self.padding_mode):
                return torch.ops.aten.mkldnn_convolution(
                    x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
                )
        return self._conv_forward(x, self.weight, self.bias)


def _onednn_applies(x: torch.Tensor, padding_mode: str) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and padding_mode == "zeros"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
    )


def _use_onednn_convolutions(module: nn.Module) -> None:
    """Every ``nn.Conv3d`` of ``module`` (MONAI's blocks build them) becomes a ``OneDNNConv3d``, which
    adds no state: parameters and state-dict keys are unchanged.

    Not done for the instance norms, though they cost a fifth of the CPU forward pass: as
    ``F.group_norm`` with one group per channel they are 4x faster at batch 1, but PyTorch's CPU group
    norm in channels_last order computes the variance in one pass (an error of 0.4 for inputs of mean
    100 and variance 1), and ``torch.var_mean`` is slower than the instance norm.
    """
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = OneDNNConv3d


def _conv(in_ch: int, out_ch: int, act, norm, **kwargs) -> Convolution:
    return Convolution(3, in_ch, out_ch, act=act, norm=norm, **kwargs)


class SiameseEncoder(nn.Module):
    """Shared encoder: a residual input block, then ``len(channels) - 1`` down blocks.

    Args:
        in_channels: channels of ONE image (1 for MRI, 3 CT windows for CT).
        channels: feature channels per level, full resolution first, e.g. (32, 64, 128, 256, 512).
        convs: extra 3x3x3 convolutions after each strided down convolution, one entry per down level.
        act, norm: MONAI layer factory specs, e.g. "relu" or ("leakyrelu", {"negative_slope": 0.01}).

    ``forward(x)``: x (B, in_channels, H, W, D) -> list of feature maps, level l of shape
    (B, channels[l], H / 2**l, W / 2**l, D / 2**l).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], convs: Sequence[int], act, norm) -> None:
        super().__init__()
        if len(convs) != len(channels) - 1:
            raise ValueError(f"encoder convs needs one entry per down level: {len(channels) - 1}, got {len(convs)}")
        # Input block: no normalisation, output = first conv + second conv (residual).
        self.in_conv1 = _conv(in_channels, channels[0], act, None)
        self.in_conv2 = _conv(channels[0], channels[0], act, None)
        self.down = nn.ModuleList()
        for c_in, c_out, n in zip(channels[:-1], channels[1:], convs, strict=True):
            layers = [_conv(c_in, c_out, act, norm, strides=2, kernel_size=2, padding=0)]
            layers += [_conv(c_out, c_out, act, norm) for _ in range(n)]
            self.down.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.in_conv1(x)
        feats = [a + self.in_conv2(a)]
        for block in self.down:
            feats.append(block(feats[-1]))
        return feats


class _UpBlock(nn.Module):
    """Transposed conv (x2) + norm + act, concat the skip, then ``n_convs`` 3x3x3 conv + norm + act."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, n_convs: int, act, norm, residual: bool) -> None:
        super().__init__()
        self.up = _conv(
            in_ch, out_ch, act, norm, strides=2, kernel_size=2, padding=0, output_padding=0, is_transposed=True
        )
        self.first = _conv(out_ch + skip_ch, out_ch, act, norm)
        self.rest = nn.Sequential(*[_conv(out_ch, out_ch, act, norm) for _ in range(n_convs - 1)])
        self.residual = residual and n_convs > 1

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.first(torch.cat([self.up(x), skip], dim=1))
        y = self.rest(x)
        return x + y if self.residual else y


class GradientDecoder(nn.Module):
    """Decoder from merged (subtracted) encodings to stage outputs, coarse to fine.

    ``forward(merged)``: list of merged maps as returned by the encoder (full resolution first) ->
    list of decoder outputs, coarsest first: the bottleneck, then one per up block; the last is at
    full resolution with ``channels[0]`` channels.
    """

    def __init__(self, channels: Sequence[int], convs: Sequence[int], act, norm, residual: bool) -> None:
        super().__init__()
        if len(convs) != len(channels) - 1:
            raise ValueError(f"decoder convs needs one entry per up level: {len(channels) - 1}, got {len(convs)}")
        rev = list(channels[::-1])
        self.up = nn.ModuleList(
            _UpBlock(c_in, c_out, c_out, n, act, norm, residual)
            for c_in, c_out, n in zip(rev[:-1], rev[1:], convs, strict=True)
        )

    def forward(self, merged: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = [merged[-1]]
        # An index rather than zip(self.up, merged[-2::-1]): TorchScript cannot zip a ModuleList with a list.
        for i, block in enumerate(self.up):
            outs.append(block(outs[-1], merged[-2 - i]))
        return outs


class SpatialGradientRegNet(nn.Module):
    """Predicts the spatial gradient of the moving->fixed (and fixed->moving) sampling coordinates.

    Args:
        in_channels: channels of ONE image; the network input ``image`` has ``2 * in_channels``.
        channels: encoder channels per level (full resolution first). Defaults are the authors'.
        encoder_convs: extra convolutions per down block. decoder_convs: convolutions per up block,
            coarse to fine.
        act: activation ("relu" for CT, ("leakyrelu", {"negative_slope": 0.01}) for MRI).
        norm: normalisation of every block except the input block (instance norm without affine).
        decoder_residual: residual connection around each decoder block (the authors' MRI variant).
        deep_supervision: add one head per coarser decoder output (training only).
        symmetric: in training, also predict the fixed->moving gradient with the same weights.

    ``forward(image)`` with image (B, 2 * in_channels, H, W, D) = [moving, fixed] on channels; H, W
    and D must be divisible by ``2 ** (len(channels) - 1)``.

    - eval mode: the moving->fixed displacement field (B, 3, H, W, D) in voxels, channel i along
      tensor axis i + 2 (MONAI ``Warp`` convention), i.e. ``warped(x) = moving(x + ddf(x))``;
      float32 also under a bfloat16 / float16 autocast (see ``logits_to_gradient``).
    - training mode: a dict ``{"grad_mf": g, "grad_fm": g}`` (``grad_fm`` only when symmetric),
      each g of shape (B, S, 3, H, W, D) in (0, 2), float32 at least: S = 1 + number of
      deep-supervision heads, the final output first. g == 1 is the identity.

    The module scripts (``torch.jit.script``) and traces. For inference on volumes too large for the
    plain forward pass (full abdominal CT on CPU) use ``scripts.inferers.LowMemoryRegistrationInferer``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        encoder_convs: Sequence[int] = (1, 2, 3, 2),
        decoder_convs: Sequence[int] = (2, 3, 2, 1),
        act: str | tuple = ("leakyrelu", {"negative_slope": 0.01}),
        norm: str | tuple = ("instance", {"affine": False}),
        decoder_residual: bool = True,
        deep_supervision: bool = True,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.divisor = 2 ** (len(channels) - 1)
        self.symmetric = symmetric
        self.encoder = SiameseEncoder(in_channels, channels, encoder_convs, act, norm)
        self.decoder = GradientDecoder(channels, decoder_convs, act, norm, decoder_residual)
        self.head = self._zero_head(channels[0])
        coarse = list(channels[::-1])[:-1]  # bottleneck, then every up block but the last
        self.ds_heads = nn.ModuleList(self._zero_head(c) for c in coarse) if deep_supervision else nn.ModuleList()
        _use_onednn_convolutions(self)

    @staticmethod
    def _zero_head(in_ch: int) -> nn.Conv3d:
        # Zero weights and bias: sigmoid(0) = 0.5, g = 1, the identity transform at initialisation.
        conv = nn.Conv3d(in_ch, 3, kernel_size=3, padding=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def check_input(self, image: torch.Tensor) -> None:
        """Raises ValueError unless image is (B, 2 * in_channels, H, W, D) with H, W, D divisible by
        ``2 ** (len(channels) - 1)``."""
        if image.ndim != 5:
            raise ValueError(f"image must be (B, {2 * self.in_channels}, H, W, D), got shape {_shape(image.shape)}")
        if image.shape[1] != 2 * self.in_channels:
            raise ValueError(
                f"image must have {2 * self.in_channels} channels ([moving, fixed] with {self.in_channels} each), "
                f"got {image.shape[1]}"
            )
        for s in image.shape[2:]:
            if s % self.divisor != 0:
                raise ValueError(
                    f"spatial size must be divisible by {self.divisor}, got {_shape(image.shape[2:])}; pad the images"
                )

    def _gradients(self, diffs: list[torch.Tensor], all_heads: bool) -> torch.Tensor:
        """Decoder + heads -> g (B, S, 3, H, W, D), final output first."""
        outs = self.decoder(diffs)
        grads = [logits_to_gradient(self.head(outs[-1]))]
        if all_heads:
            size = outs[-1].shape[2:]
            for i, head in enumerate(self.ds_heads):  # an index: TorchScript cannot zip a ModuleList
                logits = F.interpolate(head(outs[i]), size=size, mode="trilinear", align_corners=True)
                grads.append(logits_to_gradient(logits))
        return torch.stack(grads, dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        self.check_input(image)
        moving, fixed = image[:, : self.in_channels], image[:, self.in_channels :]
        # One encoder pass over both images (batch-concatenated); instance norm stays per image.
        feats = self.encoder(torch.cat([moving, fixed], dim=0))
        n = moving.shape[0]
        diffs = [f[:n] - f[n:] for f in feats]
        if not self.training:  # inference: one direction, final head only
            return gradient_to_ddf(self._gradients(diffs, all_heads=False)[:, 0])
        out = {"grad_mf": self._gradients(diffs, all_heads=True)}
        if self.symmetric:
            out["grad_fm"] = self._gradients([-d for d in diffs], all_heads=True)
        return out


def logits_to_gradient(logits: torch.Tensor) -> torch.Tensor:
    """g = 2 * sigmoid(logits), in float32 at least: logits (B, 3, H, W, D) of any float dtype -> g of the
    same shape in (0, 2), float32 (float64 for float64 logits).

    Under a bfloat16 / float16 autocast the heads return reduced-precision logits. In bfloat16 (8
    significant bits) sigmoid rounds to 1 for logits above about 6, i.e. g = 2, outside (0, 2); and the
    displacement is a running sum of g - 1 over up to a few hundred voxels, where a partial sum of 10
    voxels is resolved to 1/16 voxel only. So g, and everything after it, is float32.
    """
    return 2 * torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def _shape(shape: list[int]) -> str:
    # "(1, 2, 16)", as tuple(shape) prints, in a form TorchScript can compile
    return "(" + ", ".join([str(s) for s in shape]) + ")"
