"""Inferers for ``SpatialGradientRegNet``: the plain forward pass, and a low-memory evaluation of the
same function for volumes too large for it (full abdominal CT on CPU); each in float32 or bfloat16.

Both are MONAI ``Inferer``s, called like ``SimpleInferer``: ``ddf = inferer(image, network)`` with
image (B, 2 * C, H, W, D) = [moving, fixed] on channels and ddf (B, 3, H, W, D) in voxels, float32,
channel i along tensor axis i + 2 (MONAI ``Warp`` convention). The network is the same module in
every config; a config picks the inferer with its ``inferer`` key.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.losses import DiceLoss
from monai.networks.blocks import Convolution
from torch import nn

from scripts.deformation import (
    compose_ddf,
    ddf_to_gradient,
    flip_ddf,
    gradient_to_ddf,
    invert_ddf,
    smooth_ddf,
    warp_image,
)
from scripts.losses import LocalNCCLoss
from scripts.networks import SpatialGradientRegNet, logits_to_gradient

__all__ = ["RegistrationInferer", "LowMemoryRegistrationInferer", "RegistrationTestTimeInferer", "native_bfloat16"]


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (CUDA GPUs that support it; CPUs with
    AVX512-BF16 or AMX, as oneDNN reports), i.e. where bfloat16 inference is faster than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class RegistrationInferer(Inferer):
    """``network(image)``, optionally with the convolutions in bfloat16.

    Args:
        dtype: "float32" (default; also ``torch.float32``): the network as it is, no autocast of its
            own (an enclosing autocast, e.g. an engine's ``amp``, still applies). "auto": bfloat16
            where the device computes it natively (``native_bfloat16``), else float32. "bfloat16": the
            forward pass runs under ``torch.autocast(dtype=torch.bfloat16)``; the network computes g
            from the heads' logits in float32 (``scripts.networks.logits_to_gradient``) and
            integrates it in float32, so the DDF is float32 either way.
            bfloat16 halves the activations' memory; it is faster only where the hardware computes
            in bfloat16 (GPUs, CPUs with AVX512-BF16 or AMX): on an AVX2-only CPU its convolutions
            were about 25 times slower than float32.

    ``__call__(inputs, network)``: inputs (B, 2 * C, H, W, D); network a ``SpatialGradientRegNet``,
    possibly wrapped (DistributedDataParallel) or TorchScript -> what the network returns: in eval
    mode the DDF (B, 3, H, W, D) in voxels.
    """

    def __init__(self, dtype: str | torch.dtype = "float32") -> None:
        super().__init__()
        self.auto = dtype == "auto"
        self.dtype = torch.float32 if self.auto else getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'auto', got {dtype!r}")

    def dtype_for(self, device: torch.device) -> torch.dtype:
        """The precision used on ``device``."""
        return torch.bfloat16 if self.auto and native_bfloat16(device) else self.dtype

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        dtype = self.dtype_for(inputs.device)
        with contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(inputs.device.type, dtype=dtype):
            return network(inputs)


class RegistrationTestTimeInferer(Inferer):
    """Test-time options around a registration inferer (``inferer``: ``RegistrationInferer`` by default,
    ``LowMemoryRegistrationInferer`` for whole CT): flip augmentation, an ensemble of networks, iterative refinement and
    instance optimisation. With none of them (the defaults) it is ``inferer`` itself.

    - ``flips``: besides the images as they are, register them flipped along these spatial axes
      (e.g. ``[[0], [1], [2]]``; "all" for the 7 non-empty combinations of the 3 axes), and bring
      each field back to the unflipped grid (the field flipped, its components along the flipped
      axes negated).
    - ``members``: more networks of the same input and output (e.g. independently trained models,
      loaded with ``scripts.weights.load_pretrained``); each runs on every flip.
    - ``symmetric``: also register fixed -> moving (the images swapped: what the network learnt in
      symmetric training) and use the inverse of that field (``scripts.deformation.invert_ddf``) as
      one more moving -> fixed estimate, for every flip and member.
    - The result of the above is the mean of all these DDFs. A mean of DDFs is the DDF of the mean
      spatial gradient g (integration is linear), and g of every member is positive, so the mean stays
      free of self-crossing along each axis, as the network's own fields are (the inverse fields of
      ``symmetric`` are not of that form: no such guarantee with it).
    - ``passes`` > 1: iterative refinement. The moving image is warped by the field so far (trilinear,
      border padding) and registered again to the fixed image with all of the above; the new field
      is composed with the one so far (``scripts.deformation.compose_ddf``), ``passes`` times in all.
      The composed map's Jacobian determinant is the product of the two maps' (at corresponding
      points): it folds only where one of them does, but g along an axis may leave (0, 2). Each pass
      costs one more set of network passes.
    - ``steps`` > 0: instance optimisation of that DDF for this one pair: the head's logits that give
      it (``logit(g / 2)``) plus a correction, on a grid ``grid`` times coarser than the image and
      upsampled trilinearly, minimised with Adam (``lr``) on ``similarity`` (the training loss's
      "lncc" or "mse") between the warped moving and the fixed image, plus ``smooth_weight`` times
      the training regulariser mean |sigmoid - 0.5|. g = 2 * sigmoid stays in (0, 2). The correction
      starts at zero, so the start is the network's prediction. With ``similarity`` "dice" the images
      are not compared: ``segmenter`` (a segmentation network taking one image, B x C x H x W x D, to
      background-first class logits) labels both once, and the loss is the soft Dice loss (MONAI
      ``DiceLoss``, over the batch, foreground classes averaged) between the warped (trilinear) moving
      probabilities and the fixed ones: labels predicted for images whose own labels are unknown, the
      paper's "noisy labels" used at test time.
    - ``sigma`` > 0: last, the field is smoothed by a Gaussian of ``sigma`` voxels
      (``scripts.deformation.smooth_ddf``: borders replicated, translations unchanged; a positive g
      stays positive).

    Args:
        inferer: runs each network pass (each flip, each member); ``RegistrationInferer()`` if None.
        flips, members, symmetric, passes, steps, lr, similarity, smooth_weight, grid, sigma: as above.
        lncc_kernel_size: window of the "lncc" similarity (the training default, 9).
        segmenter: the segmentation network of the "dice" similarity (required by it, refused with the
            others); run in eval mode, without autograd, in its own parameters' dtype.

    The optimisation runs in float32 (float64 for a float64 network) whatever the enclosing autocast
    or the passes' precision.

    ``__call__(inputs, network)``: as ``inferer``, inputs (B, 2 * C, H, W, D) = [moving,
    fixed] -> ddf (B, 3, H, W, D) float32. With ``steps`` > 0 autograd is enabled inside (the
    evaluator's ``no_grad`` is overridden for the correction only) and the result is detached.
    """

    def __init__(
        self,
        inferer: Inferer | None = None,
        flips: str | Sequence[Sequence[int]] = (),
        members: Sequence[nn.Module] = (),
        symmetric: bool = False,
        passes: int = 1,
        steps: int = 0,
        lr: float = 0.01,
        similarity: str = "lncc",
        smooth_weight: float = 0.1,
        grid: int = 2,
        lncc_kernel_size: int = 9,
        sigma: float = 0.0,
        segmenter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.inferer = RegistrationInferer() if inferer is None else inferer
        if flips == "all":
            flips = [c for r in (1, 2, 3) for c in itertools.combinations(range(3), r)]
        elif isinstance(flips, str):
            raise ValueError(f"flips must be 'all' or a list of axis lists such as [[0], [1, 2]], got {flips!r}")
        self.flips = [()]
        for axes in flips:
            axes = tuple(sorted({int(a) for a in axes}))
            if not axes or any(a not in (0, 1, 2) for a in axes):
                raise ValueError(f"each flip is a non-empty list of spatial axes 0, 1, 2, got {list(axes)}")
            if axes not in self.flips:
                self.flips.append(axes)
        self.members = list(members)
        self.symmetric = bool(symmetric)
        if int(passes) != passes or int(passes) < 1:
            raise ValueError(
                f"passes (registrations composed, 1 = no refinement) must be a positive integer, got {passes!r}"
            )
        self.passes = int(passes)
        if int(steps) < 0 or float(lr) < 0 or float(smooth_weight) < 0 or int(grid) < 1:
            raise ValueError(
                f"steps, lr and smooth_weight must not be negative and grid must be at least 1, got steps={steps}, "
                f"lr={lr}, smooth_weight={smooth_weight}, grid={grid}"
            )
        self.steps, self.lr, self.smooth_weight, self.grid = int(steps), float(lr), float(smooth_weight), int(grid)
        self.sigma = float(sigma)
        if not self.sigma >= 0:
            raise ValueError(f"sigma (the field's Gaussian smoothing, voxels) must not be negative, got {sigma}")
        if similarity == "lncc":
            self.similarity: nn.Module = LocalNCCLoss(kernel_size=lncc_kernel_size)
        elif similarity == "mse":
            self.similarity = nn.MSELoss()
        elif similarity == "dice":
            self.similarity = DiceLoss(batch=True, smooth_nr=0.0, smooth_dr=1e-6)
        else:
            raise ValueError(f"similarity must be 'lncc', 'mse' or 'dice', got {similarity!r}")
        if (similarity == "dice") != (segmenter is not None):
            raise ValueError(
                "the 'dice' similarity compares the two images' predicted segmentations: it needs a segmenter "
                "(inference.json: --io_seg_ckpt) and the other similarities take none, got similarity "
                f"{similarity!r} with {'a' if segmenter is not None else 'no'} segmenter"
            )
        self.segmenter = segmenter

    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        for member in self.members:  # built from the network before the evaluator put it in eval mode
            member.train(network.training)
        ddf = self.estimate(inputs, network)
        c = inputs.shape[1] // 2
        for _ in range(self.passes - 1):
            moved = warp_image(inputs[:, :c].as_subclass(torch.Tensor), ddf.to(inputs.dtype)).to(inputs.dtype)
            ddf = compose_ddf(
                ddf, self.estimate(torch.cat([moved, inputs[:, c:].as_subclass(torch.Tensor)], 1), network)
            )
        if self.steps:
            ddf = self.optimise(inputs, ddf)
        return smooth_ddf(ddf, self.sigma)

    def estimate(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """One registration of the pair ``inputs``: the mean DDF over flips, members and the symmetric
        estimate (see the class)."""
        ddfs = []
        for net in [network, *self.members]:
            for axes in self.flips:
                flipped = inputs.flip([a + 2 for a in axes]) if axes else inputs
                ddfs.append(flip_ddf(self.inferer(flipped, net), axes))
                if self.symmetric:
                    c = inputs.shape[1] // 2
                    swapped = torch.cat([flipped[:, c:], flipped[:, :c]], dim=1)
                    ddfs.append(invert_ddf(flip_ddf(self.inferer(swapped, net), axes)))
        return ddfs[0] if len(ddfs) == 1 else torch.stack(ddfs).mean(0)

    def optimise(self, inputs: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Instance optimisation (see the class) of ``ddf`` (B, 3, H, W, D) for the pair ``inputs``."""
        c = inputs.shape[1] // 2
        dtype = torch.promote_types(ddf.dtype, torch.float32)
        x = inputs.as_subclass(torch.Tensor).detach().to(dtype)
        moving, fixed = x[:, :c], x[:, c:]
        if self.segmenter is not None:
            moving, fixed = self.foreground(moving).to(dtype), self.foreground(fixed).to(dtype)
        # g of a network prediction lies in (0, 2); rounding in the integration may touch the bounds
        g = ddf_to_gradient(ddf.as_subclass(torch.Tensor).detach().to(dtype)).clamp(1e-6, 2 - 1e-6)
        start = torch.logit(g / 2)
        size = ddf.shape[2:]
        coarse = [max(1, -(-n // self.grid)) for n in size]
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            delta = torch.zeros((ddf.shape[0], 3, *coarse), device=ddf.device, dtype=dtype, requires_grad=True)
            optimiser = torch.optim.Adam([delta], lr=self.lr)
            for _ in range(self.steps):
                correction = delta if self.grid == 1 else F.interpolate(delta, size=size, mode="trilinear")
                logits = start + correction
                loss = self.similarity(warp_image(moving, gradient_to_ddf(logits_to_gradient(logits))), fixed)
                if self.smooth_weight:
                    loss = loss + self.smooth_weight * (torch.sigmoid(logits) - 0.5).abs().mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            correction = delta if self.grid == 1 else F.interpolate(delta, size=size, mode="trilinear")
            return gradient_to_ddf(logits_to_gradient(start + correction.detach()))

    def foreground(self, image: torch.Tensor) -> torch.Tensor:
        """The segmenter's foreground class probabilities (B, K - 1, H, W, D) for ``image``."""
        self.segmenter.eval()
        parameter = next(self.segmenter.parameters(), image)
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            logits = self.segmenter(image.to(device=parameter.device, dtype=parameter.dtype))
        return torch.softmax(logits.as_subclass(torch.Tensor).float(), 1)[:, 1:].to(image.device)


class LowMemoryRegistrationInferer(RegistrationInferer):
    """The eval-mode DDF of ``SpatialGradientRegNet`` with each full-resolution feature map existing
    about once, so that a full abdominal CT pair (2 x 3 x 192 x 160 x 256) fits in CPU memory.

    The plain forward pass peaks near 10 GB there: both images are encoded as one batch, every skip is
    concatenated at full size, and each full-resolution convolution needs about three times its output
    (oneDNN copies input and output into a blocked layout). Here the same weights compute the same
    function (equal to the plain forward to rounding; tested to 1e-9 in float64) with: the images
    encoded one after the other and their difference taken in place, each skip freed once decoded,
    every convolution run in slabs of about ``slab_voxels`` output voxels along the first spatial axis
    (skip concatenation per slab), instance norm and activation in place. The integration is not
    tiled: the cumulative sum runs over the whole axis, in float32.

    Args:
        slab_voxels: output voxels per slab and channel (the plane size times the slab thickness).
            Volumes of at most this many voxels run the plain forward pass, which is faster there.
        dtype: as ``RegistrationInferer``; with "bfloat16" the images, activations, slabs and the
            weights are bfloat16 end to end (half the memory); the head's logits are cast to
            float32, so g and its cumulative sum are float32.

    ``__call__(inputs, network)``: inputs (B, 2 * C, H, W, D); network an eval-mode
    ``SpatialGradientRegNet``, or one wrapped in (Distributed)DataParallel -> ddf (B, 3, H, W, D) in
    voxels, float32 (float64 for a float64 network and input with dtype "float32"). Runs without
    autograd: the result is not differentiable (use ``RegistrationInferer`` for that).
    """

    def __init__(self, slab_voxels: int = 2**21, dtype: str | torch.dtype = "float32") -> None:
        super().__init__(dtype)
        if int(slab_voxels) < 1:
            raise ValueError(f"slab_voxels must be a positive number of voxels, got {slab_voxels}")
        self.slab_voxels = int(slab_voxels)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        net = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
        if not isinstance(net, SpatialGradientRegNet):
            raise TypeError(
                f"{type(self).__name__} evaluates the layers of a SpatialGradientRegNet, got {type(net).__name__}; "
                "use RegistrationInferer for other networks (e.g. a TorchScript export)"
            )
        if net.training:
            raise ValueError(f"{type(self).__name__} computes the eval-mode DDF: call network.eval() first")
        net.check_input(inputs)
        if inputs[0, 0].numel() <= self.slab_voxels:
            return super().__call__(inputs, network)
        # A plain tensor: MONAI's MetaTensor (what evaluators pass) would track metadata through every slab
        # operation. float32 leaves the dtype as it is (float64 in the tests), as the plain forward pass does.
        x = inputs.as_subclass(torch.Tensor)
        x = x.to(torch.bfloat16) if self.dtype_for(x.device) == torch.bfloat16 else x
        c, v = net.in_channels, self.slab_voxels
        diffs = _encode(net, x[:, :c], v)
        for d, f in zip(diffs, _encode(net, x[:, c:], v), strict=True):
            d.sub_(f)
        y = diffs.pop()
        for block in net.decoder.up:
            skip = diffs.pop()
            up = _block_slabs(block.up, [y], v)
            del y
            y = _block_slabs(block.first, [up, skip], v)
            del up, skip
            z = y
            for conv in block.rest:
                z = _block_slabs(conv, [z], v)
            y = z.add_(y) if block.residual else z
        logits = _conv_slabs(net.head, [y], v)
        del y
        return gradient_to_ddf(logits_to_gradient(logits))


def _encode(net: SpatialGradientRegNet, x: torch.Tensor, slab_voxels: int) -> list[torch.Tensor]:
    """``net.encoder(x)`` slab by slab: x (B, C, H, W, D) -> the encoder's feature maps."""
    enc = net.encoder
    a = _block_slabs(enc.in_conv1, [x], slab_voxels)
    feats = [a.add_(_block_slabs(enc.in_conv2, [a], slab_voxels))]
    for block in enc.down:
        y = feats[-1]
        for conv in block:
            y = _block_slabs(conv, [y], slab_voxels)
        feats.append(y)
    return feats


def _block_slabs(block: Convolution, inputs: Sequence[torch.Tensor], slab_voxels: int) -> torch.Tensor:
    """A MONAI ``Convolution`` block (conv, then norm / dropout / act) on ``torch.cat(inputs, 1)``."""
    x = _conv_slabs(block.conv, inputs, slab_voxels)
    return _adn_inplace(block.adn, x) if hasattr(block, "adn") else x


def _conv_slabs(conv: nn.Module, inputs: Sequence[torch.Tensor], slab_voxels: int) -> torch.Tensor:
    """``conv(torch.cat(inputs, 1))`` computed in slabs of about ``slab_voxels`` output voxels along
    the first spatial axis (contiguous blocks); the concatenation only ever exists for one slab.

    inputs: (B, C_k, H, W, D) each, of one dtype, which is also the output's: the weights are cast to
    it. Conv3d (any kernel, stride and zero padding) and ConvTranspose3d with kernel == stride and no
    padding."""
    if conv.dilation != (1, 1, 1) or conv.groups != 1 or getattr(conv, "padding_mode", "zeros") != "zeros":
        raise NotImplementedError(f"slab-wise evaluation does not support {conv}")
    first = inputs[0]
    weight = conv.weight.to(first.dtype)
    bias = None if conv.bias is None else conv.bias.to(first.dtype)
    n_in = first.shape[2]
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    transposed = isinstance(conv, nn.ConvTranspose3d)
    if transposed:
        if conv.kernel_size != conv.stride or conv.padding != (0, 0, 0) or conv.output_padding != (0, 0, 0):
            raise NotImplementedError(f"slab-wise evaluation does not support {conv}")
        n_out = n_in * s
        plane = [n * st for n, st in zip(first.shape[3:], conv.stride[1:], strict=True)]
    else:
        n_out = (n_in + 2 * p - k) // s + 1
        plane = [
            (n + 2 * pp - kk) // st + 1
            for n, pp, kk, st in zip(
                first.shape[3:], conv.padding[1:], conv.kernel_size[1:], conv.stride[1:], strict=True
            )
        ]
    out = first.new_empty((first.shape[0], conv.out_channels, n_out, *plane))
    step = max(1, slab_voxels // (plane[0] * plane[1]))
    if transposed:
        step = max(s, step - step % s)
    for a in range(0, n_out, step):
        b = min(a + step, n_out)
        if transposed:
            x = torch.cat([t[:, :, a // s : b // s] for t in inputs], 1)
            out[:, :, a:b] = F.conv_transpose3d(x, weight, bias, conv.stride)
            continue
        lo, hi = a * s - p, (b - 1) * s - p + k  # input slices needed, in zero-padded coordinates
        x = torch.cat([t[:, :, max(lo, 0) : min(hi, n_in)] for t in inputs], 1)
        if lo < 0 or hi > n_in:
            x = F.pad(x, (0, 0, 0, 0, max(-lo, 0), max(hi - n_in, 0)))
        out[:, :, a:b] = F.conv3d(x, weight, bias, (s, *conv.stride[1:]), (0, *conv.padding[1:]))
    return out


def _adn_inplace(adn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ADN (norm / dropout / activation) applied in place where the layer allows it; x (B, C, H, W, D)."""
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
