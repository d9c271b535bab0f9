"""Tests of scripts/networks.py: identity at initialisation, output shapes and ranges, one set of
weights for both directions, the authors' size, configurability, input checks, g and its integration in
float32 under a bfloat16 autocast, and TorchScript scripting and tracing (also with channels_last_3d
weights). The inferers (low-memory, bfloat16) are tested in tests/test_inferers.py."""

import warnings

import pytest
import torch

from scripts.deformation import gradient_to_ddf, warp_image
from scripts.networks import SpatialGradientRegNet, logits_to_gradient

SMALL = dict(channels=(4, 8, 16, 32, 64))  # default depth (5 levels, 4 deep-supervision heads), tiny widths
SIZE = (16, 16, 32)  # divisible by 16; anisotropic so an axis mix-up would show


def randomise_heads(net, scale=0.05, seed=0):
    """The zero heads make every output the identity; give them small random weights instead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in [net.head, *net.ds_heads]:
            head.weight.copy_(scale * torch.randn(head.weight.shape, generator=gen))
            head.bias.copy_(scale * torch.randn(head.bias.shape, generator=gen))
    return net


def pair(batch=2, in_channels=1, size=SIZE, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 2 * in_channels, *size, generator=gen)


# --------------------------------------------------------------------------- identity at initialisation
def test_zero_head_gives_exact_identity():
    net = SpatialGradientRegNet(**SMALL).eval()
    image = pair()
    with torch.no_grad():
        ddf = net(image)
    assert ddf.shape == (2, 3, *SIZE)
    assert torch.count_nonzero(ddf) == 0
    warped = warp_image(image[:, :1], ddf)
    assert torch.allclose(warped, image[:, :1], atol=1e-5)
    # training outputs are exactly g == 1 for every head and both directions
    out = net.train()(image)
    for key in ("grad_mf", "grad_fm"):
        assert torch.equal(out[key], torch.ones_like(out[key]))


# --------------------------------------------------------------------------- training outputs
@pytest.mark.parametrize("deep_supervision, n_out", [(True, 5), (False, 1)])
def test_training_output_shapes_and_range(deep_supervision, n_out):
    net = randomise_heads(SpatialGradientRegNet(**SMALL, deep_supervision=deep_supervision), scale=0.05).train()
    out = net(pair())
    assert set(out) == {"grad_mf", "grad_fm"}
    for g in out.values():
        assert g.shape == (2, n_out, 3, *SIZE)
        assert (g > 0).all() and (g < 2).all()
        assert g.std() > 1e-3  # not the identity any more: the check above is not vacuous
    assert len(net.ds_heads) == n_out - 1


def test_final_output_is_first_and_matches_eval():
    net = randomise_heads(SpatialGradientRegNet(**SMALL)).train()
    image = pair()
    with torch.no_grad():
        g = net(image)["grad_mf"]
        ddf = net.eval()(image)
    assert torch.allclose(ddf, gradient_to_ddf(g[:, 0]), atol=1e-4)  # float32 rounding of a cumulative sum
    # the deep-supervision heads differ from the final head
    assert not torch.allclose(g[:, 0], g[:, 1])


def test_both_directions_share_all_weights():
    net = randomise_heads(SpatialGradientRegNet(**SMALL), seed=3)
    # one encoder and one decoder module; no per-direction copies of anything
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"encoder", "decoder", "head", "ds_heads"}
    # no layer keeps running statistics (instance norm without tracking, no dropout), so train and
    # eval compute the same thing, and the batch position of a case does not matter
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "track_running_stats", False) for m in net.modules())
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in net.modules())

    image = pair(seed=4).double()  # float64: the two paths differ only by rounding
    moving, fixed = image[:, :1], image[:, 1:]
    net.double()
    with torch.no_grad():
        out = net.train()(torch.cat([moving, fixed], 1))
        ddf_fm = net.eval()(torch.cat([fixed, moving], 1))
    assert torch.allclose(ddf_fm, gradient_to_ddf(out["grad_fm"][:, 0]), atol=1e-9)
    assert not torch.allclose(out["grad_fm"], out["grad_mf"], atol=1e-3)  # the directions do differ


def test_symmetric_false_has_one_direction():
    out = SpatialGradientRegNet(**SMALL, symmetric=False).train()(pair(batch=1))
    assert set(out) == {"grad_mf"}


def test_training_gradient_reaches_every_parameter():
    net = randomise_heads(SpatialGradientRegNet(**SMALL)).train()
    out = net(pair(batch=1))
    (out["grad_mf"].square().mean() + out["grad_fm"].pow(3).mean()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


# --------------------------------------------------------------------------- size and configurability
def test_default_parameter_count():
    net = SpatialGradientRegNet()
    assert sum(p.numel() for p in net.parameters()) == 30_823_311  # about 30.8 M (docs/method.md)
    assert len(net.ds_heads) == 4


def test_every_size_is_an_argument():
    net = SpatialGradientRegNet(
        in_channels=3,
        channels=(4, 8, 16),
        encoder_convs=(1, 1),
        decoder_convs=(1, 2),
        act="relu",
        norm=None,
        decoder_residual=False,
        deep_supervision=False,
        symmetric=False,
    )
    assert len(net.encoder.down) == 2 and len(net.decoder.up) == 2
    assert [len(b) for b in net.encoder.down] == [2, 2]  # strided conv + 1 conv each
    assert [len(b.rest) for b in net.decoder.up] == [0, 1]  # convs per stage (1, 2): first + rest
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())
    image = pair(batch=1, in_channels=3, size=(8, 12, 4))  # only needs divisibility by 2**2
    out = net.train()(image)
    assert set(out) == {"grad_mf"} and out["grad_mf"].shape == (1, 1, 3, 8, 12, 4)
    assert net.eval()(image).shape == (1, 3, 8, 12, 4)
    # a wider config really changes the layer widths
    wide = SpatialGradientRegNet(channels=(8, 16, 32, 64, 128))
    assert wide.encoder.in_conv1.conv.out_channels == 8 and wide.head.in_channels == 8
    assert SpatialGradientRegNet(**SMALL).encoder.down[3][0].conv.out_channels == 64


def test_default_activation_and_norm():
    net = SpatialGradientRegNet(**SMALL)
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(m.negative_slope == 0.01 for m in acts)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and not any(m.affine for m in norms)
    # the input block has no normalisation
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.encoder.in_conv1.modules())


@pytest.mark.parametrize(
    "shape, expected, given",
    [
        ((1, 3, 16, 16, 16), "2 channels", "got 3"),
        ((1, 2, 16, 16), r"\(B, 2, H, W, D\)", r"\(1, 2, 16, 16\)"),
        ((2, 2, 16, 16, 16, 1), r"\(B, 2, H, W, D\)", r"\(2, 2, 16, 16, 16, 1\)"),
        ((1, 2, 16, 24, 16), "divisible by 16", r"\(16, 24, 16\)"),
    ],
)
def test_clear_input_errors(shape, expected, given):
    net = SpatialGradientRegNet(**SMALL)
    with pytest.raises(ValueError, match=expected) as err:
        net(torch.zeros(shape))
    assert err.match(given)


# --------------------------------------------------------------------------- precision
def test_gradient_is_float32_in_open_interval_under_bfloat16_autocast():
    # bfloat16 rounds sigmoid(7) to exactly 1, i.e. g = 2; the cast before the sigmoid keeps g < 2.
    logits = torch.tensor([-7.0, -1.0, 0.0, 1.0, 7.0], dtype=torch.bfloat16)
    assert torch.equal(2 * torch.sigmoid(logits)[-1], torch.tensor(2.0, dtype=torch.bfloat16))
    g = logits_to_gradient(logits)
    assert g.dtype == torch.float32 and (g > 0).all() and (g < 2).all()
    assert logits_to_gradient(logits.double()).dtype == torch.float64  # never lowers the precision
    # the network's training outputs (what the loss integrates) are float32 under autocast too
    net = randomise_heads(SpatialGradientRegNet(**SMALL, deep_supervision=False)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(pair(batch=1))
        assert net.head(torch.zeros(1, 4, 3, 3, 3)).dtype == torch.bfloat16  # the autocast is active
    assert all(g.dtype == torch.float32 for g in out.values())


# --------------------------------------------------------------------------- export
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last_3d]


def _export_pair(memory_format):
    """A random-head float64 network in eval mode, its weights in ``memory_format``, and a contiguous
    float64 copy as the reference: float64, so that the compared paths differ only by rounding."""
    ref = randomise_heads(SpatialGradientRegNet(**SMALL)).double().eval()
    net = SpatialGradientRegNet(**SMALL).double().eval()
    net.load_state_dict(ref.state_dict())
    net = net.to(memory_format=memory_format)
    assert net.head.weight.is_contiguous(memory_format=memory_format)
    return ref, net


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last_3d"])
def test_jit_script_matches_eager(memory_format, tmp_path):
    # what `monai.bundle ckpt_export` does by default (torch.jit.script, then torch.jit.save)
    ref, net = _export_pair(memory_format)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "model.ts"))
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    new = pair(batch=1, seed=7).double()
    with torch.no_grad():
        eager, out = ref(new), scripted(new)
    assert eager.abs().max() > 1e-3  # not the zero field
    assert out.shape == (1, 3, *SIZE) and torch.allclose(eager, out, rtol=0, atol=1e-9)
    # the training branch is compiled as well and returns the same gradients
    with torch.no_grad():
        eager_train, out_train = ref.train()(new), scripted.train()(new)
    assert set(out_train) == {"grad_mf", "grad_fm"}
    assert all(torch.allclose(eager_train[k], out_train[k], rtol=0, atol=1e-9) for k in eager_train)
    # and so are the input checks, with the eager messages
    with pytest.raises(Exception, match=r"divisible by 16, got \(16, 16, 24\)"):
        scripted.eval()(torch.zeros(1, 2, 16, 16, 24, dtype=torch.float64))


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last_3d"])
def test_jit_trace_matches_eager(memory_format):
    ref, net = _export_pair(memory_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape checks and torch's deprecation notice
        traced = torch.jit.trace(net, pair(batch=1).double())
    new = pair(batch=1, seed=7).double()
    with torch.no_grad():
        eager, out = ref(new), traced(new)
    assert eager.abs().max() > 1e-3  # not the zero field
    assert torch.allclose(eager, out, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- channels_last_3d (train.json's default)
def test_channels_last_training_step_matches_contiguous():
    """train.json stores the weights channels_last_3d (faster convolutions on CPU). One training step
    on the same batch must give the contiguous float32 loss to 1e-5 (relative) and its gradient to 2 %
    (norm of the difference over the norm). The gradient of a randomly initialised network is
    ill-conditioned: a 1e-7 relative change of the input moves it by about 0.3 % already."""
    from scripts.losses import SymmetricRegistrationLoss

    torch.manual_seed(0)
    ref = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.05).train()
    fast = SpatialGradientRegNet(**SMALL).train()
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(memory_format=torch.channels_last_3d)
    assert fast.head.weight.is_contiguous(memory_format=torch.channels_last_3d)
    image = pair(seed=3, size=(32, 32, 32))
    batch = {"moving_image": image[:, :1], "fixed_image": image[:, 1:]}
    batch["moving_label"] = (batch["moving_image"] > 0.5).long()
    batch["fixed_label"] = (batch["fixed_image"] > 0.5).long()
    loss_fn = SymmetricRegistrationLoss(similarity="lncc", lncc_kernel_size=5, num_labels=2)
    losses, grads = [], []
    for net in (ref, fast):
        loss = loss_fn(net(image), batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0].norm() > 0
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.02


# --------------------------------------------------------------------------- oneDNN convolutions on CPU
def _conv_kernels(net, image):
    """Names of the convolution kernels one eval forward pass runs."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        net(image)
    return {e.key for e in prof.key_averages() if "conv" in e.key and "transpose" not in e.key}


def test_batch1_cpu_inference_runs_every_convolution_on_onednn():
    """PyTorch sends a batch-1 3D convolution with B * C * H * W <= 20480 to its slow native kernel;
    the network's convolutions take oneDNN instead. The same network built of plain nn.Conv3d does
    hit the slow kernel (so this test can fail), and gives the same field."""
    from torch import nn

    from scripts.networks import OneDNNConv3d

    net = randomise_heads(SpatialGradientRegNet(channels=(8, 16, 32, 64, 128), deep_supervision=False)).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is OneDNNConv3d for m in convs)
    image = pair(batch=1, size=(32, 32, 32))
    kernels = _conv_kernels(net, image)
    assert "aten::mkldnn_convolution" in kernels and "aten::slow_conv3d_forward" not in kernels
    with torch.inference_mode():
        fast = net(image)
    for m in convs:
        m.__class__ = nn.Conv3d
    assert "aten::slow_conv3d_forward" in _conv_kernels(net, image)
    with torch.inference_mode():
        plain = net(image)
    assert fast.abs().max() > 1e-2 and torch.allclose(fast, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("stride, kernel, padding", [(1, 3, 1), (2, 2, 0)])
def test_onednn_convolution_equals_conv3d_with_gradients(memory_format, stride, kernel, padding):
    from torch import nn

    from scripts.networks import OneDNNConv3d

    torch.manual_seed(0)
    ref = nn.Conv3d(16, 8, kernel, stride=stride, padding=padding).to(memory_format=memory_format)
    fast = OneDNNConv3d(16, 8, kernel, stride=stride, padding=padding).to(memory_format=memory_format)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 16, 16, 16).contiguous(memory_format=memory_format)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    assert yf.shape == yr.shape and torch.allclose(yf, yr, rtol=1e-5, atol=1e-5)
    weights = torch.randn(yr.shape)
    (yr * weights).sum().backward()
    (yf * weights).sum().backward()
    for a, b in [(xr.grad, xf.grad), (ref.weight.grad, fast.weight.grad), (ref.bias.grad, fast.bias.grad)]:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_onednn_path_is_not_exported_or_autocast():
    """Scripting and tracing record the standard convolution (an exported model runs anywhere), and a
    bfloat16 autocast still casts the convolutions."""
    net = randomise_heads(SpatialGradientRegNet(**SMALL, deep_supervision=False)).eval()
    image = pair(batch=1)
    assert "mkldnn_convolution" not in str(torch.jit.script(net).inlined_graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, image)
    assert "mkldnn_convolution" not in str(traced.inlined_graph)
    assert "aten::_convolution" in str(traced.inlined_graph)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        head_input = net.decoder(net.encoder(image[:, :1]))[-1]
    assert head_input.dtype == torch.bfloat16
