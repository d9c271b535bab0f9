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

__all__ = ["SiameseEncoder", "GradientDecoder", "SpatialGradientRegNet"]

# Inference on a full abdominal CT (192 x 160 x 256, 32 channels at full resolution: ~1 GB per map)
# with the plain forward pass peaks near 10 GB on CPU: both images are encoded as one batch, and
# each full-resolution convolution needs about three times its output (oneDNN copies its input and
# output in a blocked layout). The helpers below run the same computation (same weights, same
# result up to float rounding) slab by slab along the first spatial axis, concatenating skip connections and
# normalising in place, so each full-resolution map exists once.


def _conv_slabs(conv: nn.Module, inputs: Sequence[torch.Tensor], slab_voxels: int) -> torch.Tensor:
    """``conv(torch.cat(inputs, 1))`` computed in slabs of about ``slab_voxels`` output voxels along
    the first spatial axis (contiguous blocks); the concatenation only ever exists for one slab.
    Conv3d (any kernel, stride and zero padding) and ConvTranspose3d with kernel == stride and no
    padding."""
    if conv.dilation != (1, 1, 1) or conv.groups != 1 or getattr(conv, "padding_mode", "zeros") != "zeros":
        raise NotImplementedError(f"slab-wise evaluation does not support {conv}")
    first = inputs[0]
    n_in = first.shape[2]
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    transposed = isinstance(conv, nn.ConvTranspose3d)
    if transposed:
        if conv.kernel_size != conv.stride or conv.padding != (0, 0, 0) or conv.output_padding != (0, 0, 0):
            raise NotImplementedError(f"slab-wise evaluation does not support {conv}")
        n_out = n_in * s
        plane = [n * st for n, st in zip(first.shape[3:], conv.stride[1:])]
    else:
        n_out = (n_in + 2 * p - k) // s + 1
        plane = [(n + 2 * pp - kk) // st + 1 for n, pp, kk, st in zip(first.shape[3:], conv.padding[1:], conv.kernel_size[1:], conv.stride[1:])]
    out = first.new_empty((first.shape[0], conv.out_channels, n_out, *plane))
    step = max(1, slab_voxels // (plane[0] * plane[1]))
    if transposed:
        step = max(s, step - step % s)
    for a in range(0, n_out, step):
        b = min(a + step, n_out)
        if transposed:
            x = torch.cat([t[:, :, a // s : b // s] for t in inputs], 1)
            out[:, :, a:b] = F.conv_transpose3d(x, conv.weight, conv.bias, conv.stride)
            continue
        lo, hi = a * s - p, (b - 1) * s - p + k  # input slices needed, in zero-padded coordinates
        x = torch.cat([t[:, :, max(lo, 0) : min(hi, n_in)] for t in inputs], 1)
        if lo < 0 or hi > n_in:
            x = F.pad(x, (0, 0, 0, 0, max(-lo, 0), max(hi - n_in, 0)))
        out[:, :, a:b] = F.conv3d(x, conv.weight, conv.bias, (s, *conv.stride[1:]), (0, *conv.padding[1:]))
    return out


def _adn_inplace(adn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ADN (norm / dropout / activation) applied in place where the layer allows it."""
    for layer in adn.children():
        if isinstance(layer, nn.InstanceNorm3d) and not layer.track_running_stats:
            var, mean = torch.var_mean(x, dim=(2, 3, 4), keepdim=True, correction=0)
            x.sub_(mean).mul_(torch.rsqrt(var + layer.eps))
            if layer.affine:
                x.mul_(layer.weight.view(1, -1, 1, 1, 1)).add_(layer.bias.view(1, -1, 1, 1, 1))
        elif isinstance(layer, nn.LeakyReLU):
            F.leaky_relu_(x, layer.negative_slope)
        elif isinstance(layer, nn.ReLU):
            x.relu_()
        elif not isinstance(layer, (nn.Dropout, nn.Dropout3d, nn.Identity)):  # dropout is off in eval
            x = layer(x)
    return x


def _block_slabs(block: Convolution, inputs: Sequence[torch.Tensor], slab_voxels: int) -> torch.Tensor:
    x = _conv_slabs(block.conv, inputs, slab_voxels)
    return _adn_inplace(block.adn, x) if hasattr(block, "adn") else x


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
        for c_in, c_out, n in zip(channels[:-1], channels[1:], convs):
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
        self.up = _conv(in_ch, out_ch, act, norm, strides=2, kernel_size=2, padding=0, output_padding=0, is_transposed=True)
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
            _UpBlock(c_in, c_out, c_out, n, act, norm, residual) for c_in, c_out, n in zip(rev[:-1], rev[1:], convs)
        )

    def forward(self, merged: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = [merged[-1]]
        for block, skip in zip(self.up, merged[-2::-1]):
            outs.append(block(outs[-1], skip))
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
      tensor axis i + 2 (MONAI ``Warp`` convention), i.e. ``warped(x) = moving(x + ddf(x))``.
    - training mode: a dict ``{"grad_mf": g, "grad_fm": g}`` (``grad_fm`` only when symmetric),
      each g of shape (B, S, 3, H, W, D) in (0, 2): S = 1 + number of deep-supervision heads,
      the final output first. g == 1 is the identity.
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
        # Eval without autograd on volumes larger than this many voxels takes the low-memory path,
        # in slabs of about this many output voxels (see _ddf_low_memory).
        self.slab_voxels = 2**21
        self.encoder = SiameseEncoder(in_channels, channels, encoder_convs, act, norm)
        self.decoder = GradientDecoder(channels, decoder_convs, act, norm, decoder_residual)
        self.head = self._zero_head(channels[0])
        coarse = list(channels[::-1])[:-1]  # bottleneck, then every up block but the last
        self.ds_heads = nn.ModuleList(self._zero_head(c) for c in coarse) if deep_supervision else nn.ModuleList()

    @staticmethod
    def _zero_head(in_ch: int) -> nn.Conv3d:
        # Zero weights and bias: sigmoid(0) = 0.5, g = 1, the identity transform at initialisation.
        conv = nn.Conv3d(in_ch, 3, kernel_size=3, padding=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def _check(self, image: torch.Tensor) -> None:
        if image.ndim != 5:
            raise ValueError(f"image must be (B, {2 * self.in_channels}, H, W, D), got shape {tuple(image.shape)}")
        if image.shape[1] != 2 * self.in_channels:
            raise ValueError(
                f"image must have {2 * self.in_channels} channels ([moving, fixed] with {self.in_channels} each), "
                f"got {image.shape[1]}"
            )
        if any(s % self.divisor for s in image.shape[2:]):
            raise ValueError(
                f"spatial size must be divisible by {self.divisor}, got {tuple(image.shape[2:])}; pad the images"
            )

    def _gradients(self, diffs: list[torch.Tensor], all_heads: bool) -> torch.Tensor:
        """Decoder + heads -> g (B, S, 3, H, W, D), final output first."""
        outs = self.decoder(diffs)
        grads = [2 * torch.sigmoid(self.head(outs[-1]))]
        if all_heads:
            size = outs[-1].shape[2:]
            for head, feat in zip(self.ds_heads, outs[:-1]):
                logits = F.interpolate(head(feat), size=size, mode="trilinear", align_corners=True)
                grads.append(2 * torch.sigmoid(logits))
        return torch.stack(grads, dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        self._check(image)
        moving, fixed = image[:, : self.in_channels], image[:, self.in_channels :]
        large = moving[0, 0].numel() > self.slab_voxels  # small volumes run faster in the plain pass
        if large and not self.training and not torch.is_grad_enabled() and not torch.jit.is_tracing():
            return self._ddf_low_memory(moving, fixed)
        # One encoder pass over both images (batch-concatenated); instance norm stays per image.
        feats = self.encoder(torch.cat([moving, fixed], dim=0))
        n = moving.shape[0]
        diffs = [f[:n] - f[n:] for f in feats]
        if not self.training:
            # Export (tracing) or eval with autograd: one direction, final head only.
            return gradient_to_ddf(self._gradients(diffs, all_heads=False)[:, 0])
        out = {"grad_mf": self._gradients(diffs, all_heads=True)}
        if self.symmetric:
            out["grad_fm"] = self._gradients([-d for d in diffs], all_heads=True)
        return out

    def _encode_low_memory(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc, v = self.encoder, self.slab_voxels
        a = _block_slabs(enc.in_conv1, [x], v)
        feats = [a.add_(_block_slabs(enc.in_conv2, [a], v))]
        for block in enc.down:
            y = feats[-1]
            for conv in block:
                y = _block_slabs(conv, [y], v)
            feats.append(y)
        return feats

    @torch.no_grad()
    def _ddf_low_memory(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The eval forward without autograd, computed so that each full-resolution feature map
        exists about once: the images are encoded one after the other, the difference is taken in
        place, each skip is freed once decoded, and convolutions run in slabs of ``slab_voxels``."""
        v = self.slab_voxels
        diffs = self._encode_low_memory(moving)
        for d, f in zip(diffs, self._encode_low_memory(fixed)):
            d.sub_(f)
        x = diffs.pop()
        for block in self.decoder.up:
            skip = diffs.pop()
            up = _block_slabs(block.up, [x], v)
            del x
            x = _block_slabs(block.first, [up, skip], v)
            del up, skip
            y = x
            for conv in block.rest:
                y = _block_slabs(conv, [y], v)
            x = y.add_(x) if block.residual else y
        g = _conv_slabs(self.head, [x], v)
        del x
        return gradient_to_ddf(g.sigmoid_().mul_(2))

