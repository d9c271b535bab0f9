"""Tests of scripts/networks.py: identity at initialisation, output shapes and ranges, one set of
weights for both directions, the authors' size, configurability, input checks and TorchScript tracing."""

import warnings

import pytest
import torch

from scripts.deformation import gradient_to_ddf, warp_image
from scripts.networks import SpatialGradientRegNet

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


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"act": "relu", "decoder_residual": False, "in_channels": 3}, {"norm": ("instance", {"affine": True})}],
    ids=["mri", "ct", "affine-norm"],
)
@pytest.mark.parametrize("slab_voxels", [1, 100, 4096], ids=["one-slice-slabs", "uneven-slabs", "two-slabs"])
def test_low_memory_eval_equals_plain_forward(kwargs, slab_voxels):
    # Without autograd the eval forward runs slab by slab with in-place normalisation (full-volume CT
    # within CPU memory); with autograd it is the plain module forward. In float64 both must agree to
    # rounding: a slab-boundary or normalisation mistake would show as an O(0.1 voxel) difference.
    net = randomise_heads(SpatialGradientRegNet(**SMALL, **kwargs), scale=0.1).double().eval()
    if "norm" in kwargs:  # non-trivial affine parameters
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.InstanceNorm3d):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    net.slab_voxels = slab_voxels
    image = pair(in_channels=net.in_channels).double()
    with torch.no_grad():
        lean = net(image)
    plain = net(image)
    assert lean.abs().max() > 1  # a real deformation, not the identity
    assert torch.allclose(plain, lean, rtol=0, atol=1e-9), float((plain - lean).abs().max())
    # the plain (autograd) path is differentiable, e.g. for test-time optimisation
    plain.square().mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


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
    assert sum(p.numel() for p in net.parameters()) == 30_823_311  # about 30.8 M (method.md)
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


# --------------------------------------------------------------------------- export
def test_jit_trace_matches_eager():
    # float64: eager no-grad inference takes the low-memory path, the trace the plain one
    net = randomise_heads(SpatialGradientRegNet(**SMALL)).double().eval()
    example = pair(batch=1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape checks and torch's deprecation notice
        traced = torch.jit.trace(net, example)
    new = pair(batch=1, seed=7).double()
    with torch.no_grad():
        eager, scripted = net(new), traced(new)
    assert eager.abs().max() > 1e-3  # not the zero field
    assert torch.allclose(eager, scripted, atol=1e-9)


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
