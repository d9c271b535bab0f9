"""Tests of scripts/inferers.py: the low-memory inferer computes the plain forward pass's DDF (float64,
to rounding) with about half its peak tensor memory, for bare, DataParallel / DistributedDataParallel
and channels_last_3d networks; bfloat16 runs the convolutions in bfloat16 and g and its cumulative sum
in float32, within a stated distance of the float32 DDF; the CT overlay selects the low-memory inferer."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.losses import DiceLoss
from torch.profiler import ProfilerActivity, profile

import scripts.inferers
import scripts.networks
from scripts.deformation import compose_ddf, ddf_to_gradient, flip_ddf, gradient_to_ddf, smooth_ddf, warp_image
from scripts.inferers import LowMemoryRegistrationInferer, RegistrationInferer, RegistrationTestTimeInferer
from scripts.losses import LocalNCCLoss
from scripts.networks import SpatialGradientRegNet
from tests.test_networks import SMALL, pair, randomise_heads

ROOT = Path(__file__).resolve().parents[1]


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of live CPU tensors while ``fn()`` runs, from the profiler's allocation records (what
    torch allocates; not oneDNN's own scratch buffers, which scale with the same tensors)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------- low memory, same function
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"act": "relu", "decoder_residual": False, "in_channels": 3}, {"norm": ("instance", {"affine": True})}],
    ids=["mri", "ct", "affine-norm"],
)
@pytest.mark.parametrize("slab_voxels", [1, 100, 4096], ids=["one-slice-slabs", "uneven-slabs", "two-slabs"])
def test_low_memory_equals_plain_forward(kwargs, slab_voxels):
    # In float64 both must agree to rounding: a slab-boundary or normalisation mistake would show as an
    # O(0.1 voxel) difference.
    net = randomise_heads(SpatialGradientRegNet(**SMALL, **kwargs), scale=0.1).double().eval()
    if "norm" in kwargs:  # non-trivial affine parameters
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.InstanceNorm3d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    image = pair(in_channels=net.in_channels).double()
    lean = LowMemoryRegistrationInferer(slab_voxels=slab_voxels)(image, net)
    plain = RegistrationInferer()(image, net)
    assert lean.abs().max() > 1  # a real deformation, not the identity
    assert lean.dtype == torch.float64 and not lean.requires_grad
    assert torch.allclose(plain, lean, rtol=0, atol=1e-9), float((plain - lean).abs().max())
    # the plain inferer keeps autograd, e.g. for test-time optimisation
    plain.square().mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_low_memory_halves_peak_tensor_memory():
    # Three levels of 8 channels: the full-resolution maps dominate, as in the full network. In units of
    # one full-resolution feature map (1 x 8 x H x W x D float32), measured: plain forward 8.6 (both
    # images as one batch, skips concatenated whole), low-memory 4.2, low-memory bfloat16 2.3.
    net = randomise_heads(SpatialGradientRegNet(channels=(8, 8, 8), encoder_convs=(1, 1), decoder_convs=(2, 2))).eval()
    image = pair(batch=1)
    feature_map = 8 * image[0, 0].numel() * 4
    peaks = {}
    for name, inferer in {
        "plain": RegistrationInferer(),
        "low": LowMemoryRegistrationInferer(slab_voxels=1024),
        "low-bf16": LowMemoryRegistrationInferer(slab_voxels=1024, dtype="bfloat16"),
    }.items():
        with torch.no_grad():
            peaks[name] = peak_tensor_bytes(lambda: inferer(image, net)) / feature_map
    assert peaks["plain"] > 6, peaks  # the measurement sees the plain pass's maps
    assert peaks["low"] < 0.55 * peaks["plain"], peaks
    assert peaks["low-bf16"] < 0.6 * peaks["low"], peaks


def test_small_volume_runs_the_plain_forward():
    # at most slab_voxels voxels: one slab, the plain pass (faster) gives the result bit for bit
    net = randomise_heads(SpatialGradientRegNet(**SMALL)).eval()
    image = pair(batch=1)
    with torch.no_grad():
        assert torch.equal(LowMemoryRegistrationInferer(slab_voxels=image[0, 0].numel())(image, net), net(image))


def test_metatensor_input():
    # evaluators pass MONAI MetaTensors; the slabs run on plain tensors, with the same result
    net = randomise_heads(SpatialGradientRegNet(**SMALL)).eval()
    image = pair(batch=1)
    inferer = LowMemoryRegistrationInferer(slab_voxels=1024)
    with torch.no_grad():
        ddf = inferer(MetaTensor(image, meta={"filename_or_obj": "pair.nii.gz"}), net)
        assert type(ddf) is torch.Tensor and torch.equal(ddf, inferer(image, net))


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_wrapped_network(wrapper, tmp_path):
    net = randomise_heads(SpatialGradientRegNet(**SMALL)).eval()
    image = pair(batch=1)
    if wrapper == "DistributedDataParallel":  # a one-process group, as multi_gpu_train.json builds on CPU
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = getattr(torch.nn.parallel, wrapper)(net)
        with torch.no_grad():
            lean, bare = LowMemoryRegistrationInferer(slab_voxels=1024)(image, wrapped), net(image)
            plain = RegistrationInferer()(image, wrapped)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert lean.abs().max() > 1e-2
    assert torch.allclose(lean, bare, atol=1e-4)  # float32 rounding, different summation order
    assert torch.equal(plain, bare)


def test_channels_last_weights():
    # train.json stores the weights channels_last_3d; checkpoints and networks built from it reach the
    # inferers that way
    ref = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.1).double().eval()
    net = SpatialGradientRegNet(**SMALL).double().eval()
    net.load_state_dict(ref.state_dict())
    net = net.to(memory_format=torch.channels_last_3d)
    assert net.encoder.in_conv1.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    image = pair().double()
    with torch.no_grad():
        expected = ref(image)
        lean = LowMemoryRegistrationInferer(slab_voxels=100)(image, net)
        plain = RegistrationInferer()(image, net)
        bf16 = LowMemoryRegistrationInferer(slab_voxels=100, dtype="bfloat16")(image.float(), net.float())
    assert expected.abs().max() > 1
    assert torch.allclose(lean, expected, rtol=0, atol=1e-9)
    assert torch.allclose(plain, expected, rtol=0, atol=1e-9)
    assert bf16.dtype == torch.float32 and (bf16 - expected).abs().mean() < 0.5


# --------------------------------------------------------------------------- bfloat16
@pytest.fixture
def seen_gradients(monkeypatch):
    """The g handed to ``gradient_to_ddf`` by the network and by the low-memory inferer, in call order."""
    seen = []

    def recording(grad):
        seen.append(grad.detach().clone())
        return gradient_to_ddf(grad)

    monkeypatch.setattr(scripts.networks, "gradient_to_ddf", recording)
    monkeypatch.setattr(scripts.inferers, "gradient_to_ddf", recording)
    return seen


INFERERS_BF16 = {
    "plain": RegistrationInferer(dtype="bfloat16"),
    "low-memory": LowMemoryRegistrationInferer(slab_voxels=1024, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", INFERERS_BF16)
def test_bfloat16_integrates_float32_gradient_in_open_interval(name, seen_gradients):
    # Crafted head bias: logits near +8 on axis 0, where bfloat16 rounds sigmoid to exactly 1 (g = 2),
    # and near -8 on axis 1 (g near 0); a float32 g stays strictly inside (0, 2).
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.05).eval()
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([8.0, -8.0, 0.0]))
    with torch.no_grad():
        ddf = INFERERS_BF16[name](pair(batch=1), net)
    (g,) = seen_gradients
    assert g.dtype == torch.float32 and ddf.dtype == torch.float32
    assert (g > 0).all() and (g < 2).all()
    assert g[:, 0].min() > 1.99 and g[:, 1].max() < 0.01  # the crafted saturation is reached
    # the cumulative sum ran in float32: it equals the float64 integration of the same g to float32
    # rounding (a bfloat16 sum would be off by about 0.03 voxel at |ddf| ~ 16)
    assert ddf[:, 0].abs().max() > 15
    assert torch.allclose(ddf.double(), gradient_to_ddf(g.double()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", INFERERS_BF16)
def test_bfloat16_ddf_close_to_float32(name):
    # Tolerance: mean |bf16 - float32| < 0.15 voxel and max < 1.5 voxel. Measured here (|ddf| up to 3.9):
    # plain 0.064 / 0.45, low-memory 0.044 / 0.38; over six random networks and pairs 0.04-0.10 / 0.38-1.13.
    # A randomly initialised network is very sensitive to its input: merely rounding such images to
    # bfloat16 and computing in float32 moves the DDF by up to 0.08 / 0.69 voxel.
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.05).eval()
    image = pair(batch=1)
    with torch.no_grad():
        ref = net(image)
        ddf = INFERERS_BF16[name](image, net)
    assert ref.abs().max() > 3
    err = (ddf - ref).abs()
    assert err.max() > 0.01  # the convolutions did run in bfloat16 (the float32 paths agree to 2e-3)
    assert err.mean() < 0.15 and err.max() < 1.5


def test_bfloat16_training_loss_and_gradient_close_to_float32():
    # train.json --precision bfloat16: the trainer's inferer runs the network's training passes under autocast
    # (the loss, g, its integration and the warps stay float32). The shipped weights on a real sample pair
    # (the 32^3 centre, which holds the hippocampus), one training step's loss and gradient in both precisions.
    # Tolerance: loss within 2 %, gradient cosine similarity > 0.95. Measured here on the two sample pairs:
    # 0.19 % / 0.64 %, cosine 0.992 / 0.990 (on the whole 64^3 canvas: 0.09 % / 0.16 %, 0.964 / 0.995).
    from monai.data import list_data_collate

    from scripts.workflow import PreparePair

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser["bundle_root"] = str(ROOT)
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(ROOT / "models" / "model.pt", map_location="cpu"))
    net.train()
    loss_fn = parser.get_parsed_content("loss")
    inputs, targets = PreparePair()(list_data_collate([parser.get_parsed_content("validate#dataset")[0]]), "cpu")
    centre = (slice(None), slice(None), *[slice(16, 48)] * 3)
    inputs, targets = inputs[centre], {k: v[centre] for k, v in targets.items()}
    assert (targets["moving_label"] > 0).sum() > 500 and (targets["fixed_label"] > 0).sum() > 500
    assert parser["train#trainer#inferer"].replace("::", "#") == "@train#inferer"
    results = {}
    for precision in ("float32", "bfloat16"):
        parser["precision"] = precision
        trainer_inferer = parser.get_parsed_content("train#inferer", lazy=False)
        assert type(trainer_inferer) is RegistrationInferer
        assert trainer_inferer.dtype == getattr(torch, precision)
        net.zero_grad()
        loss = loss_fn(trainer_inferer(inputs, net), targets)
        loss.backward()
        results[precision] = loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()])
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
    assert loss16 != loss32  # the network did run in bfloat16
    assert abs(loss16 - loss32) < 0.02 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) > 0.95


# --------------------------------------------------------------------------- arguments and configs
def test_clear_errors():
    net = SpatialGradientRegNet(**SMALL).eval()
    image = pair(batch=1)
    with pytest.raises(ValueError, match="'float32', 'bfloat16' or 'auto', got 'float16'"):
        RegistrationInferer(dtype="float16")
    with pytest.raises(ValueError, match="slab_voxels must be a positive"):
        LowMemoryRegistrationInferer(slab_voxels=0)
    with pytest.raises(ValueError, match=r"call network.eval\(\)"):
        LowMemoryRegistrationInferer()(image, net.train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the input checks
        exported = torch.jit.trace(net.eval(), image)
    with pytest.raises(TypeError, match="use RegistrationInferer"):
        LowMemoryRegistrationInferer()(image, exported)
    with pytest.raises(ValueError, match="divisible by 16"):
        LowMemoryRegistrationInferer()(image[..., :24], net)


def test_ct_overlay_selects_the_low_memory_inferer():
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "abdomen_ct.json")])
    inferer = parser.get_parsed_content("inferer")
    assert type(inferer) is LowMemoryRegistrationInferer
    assert inferer.dtype == torch.float32 and inferer.slab_voxels == 2**21
    # the evaluator's inferer adds the test-time options around it (none by default)
    parser["tta_flips"] = [[0]]
    test_time = parser.get_parsed_content("evaluator#inferer")
    assert type(test_time) is RegistrationTestTimeInferer and type(test_time.inferer) is LowMemoryRegistrationInferer
    assert test_time.flips == [(), (0,)]


def test_auto_precision_is_bfloat16_only_where_the_device_computes_it_natively():
    from scripts.inferers import RegistrationInferer, native_bfloat16

    auto = RegistrationInferer("auto")
    cpu = torch.device("cpu")
    assert auto.dtype_for(cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    assert RegistrationInferer("float32").dtype_for(cpu) == torch.float32
    assert RegistrationInferer("bfloat16").dtype_for(cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="'float32', 'bfloat16' or 'auto'"):
        RegistrationInferer("float16")
    if not native_bfloat16(cpu):  # this machine: "auto" must give exactly the float32 field
        net = SpatialGradientRegNet(channels=(4, 8, 16, 32, 64)).eval()
        with torch.no_grad():
            net.head.bias.fill_(0.3)
        image = torch.rand(1, 2, 16, 16, 32)
        with torch.no_grad():
            assert torch.equal(auto(image, net), RegistrationInferer("float32")(image, net))


# --------------------------------------------------------------------------- test-time options
def _moved_pair(shift=2, size=(16, 16, 32)):
    """A smooth fixed image and the same image translated by ``shift`` voxels along the last axis."""
    gen = torch.Generator().manual_seed(5)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *size, generator=gen), 5, 1, 2, count_include_pad=False)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    return torch.cat([fixed.roll(shift, dims=-1), fixed], dim=1)


def test_test_time_inferer_without_options_is_the_plain_inferer():
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.1).double().eval()
    image = pair().double()
    with torch.no_grad():
        assert torch.equal(RegistrationTestTimeInferer()(image, net), RegistrationInferer()(image, net))


def test_flips_average_the_fields_brought_back():
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.3).double().eval()
    image = pair(batch=1).double()
    with torch.no_grad():
        got = RegistrationTestTimeInferer(flips=[[1], [0, 2]])(image, net)
        parts = [net(image), flip_ddf(net(image.flip([3])), [1]), flip_ddf(net(image.flip([2, 4])), [0, 2])]
        assert torch.allclose(got, torch.stack(parts).mean(0), rtol=0, atol=1e-12)
        assert (got - parts[0]).abs().max() > 0.1  # the flipped passes change the result
        # a network whose field does not depend on the images (here: the identity) is unchanged
        identity = SpatialGradientRegNet(**SMALL).double().eval()
        assert torch.equal(RegistrationTestTimeInferer(flips="all")(image, identity), torch.zeros_like(got))
    assert RegistrationTestTimeInferer(flips="all").flips == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_ensemble_is_the_mean_field_and_of_one_network_the_network():
    nets = [randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.3, seed=s).double().eval() for s in (0, 1)]
    image = pair(batch=1).double()
    with torch.no_grad():
        both = RegistrationTestTimeInferer(members=[nets[1]])(image, nets[0])
        assert torch.allclose(both, (nets[0](image) + nets[1](image)) / 2, rtol=0, atol=1e-12)
        same = RegistrationTestTimeInferer(members=[copy.deepcopy(nets[0])])(image, nets[0])
        assert torch.allclose(same, nets[0](image), rtol=0, atol=1e-12)
    # members follow the network's mode (they are built from it before the evaluator calls eval())
    member = SpatialGradientRegNet(**SMALL).double().train()
    with torch.no_grad():
        RegistrationTestTimeInferer(members=[member])(image, nets[0])
    assert not member.training


class _Translation(torch.nn.Module):
    """A stand-in network: a translation along the last axis by the difference of the two images' means
    (times 10), so swapping the images gives the exact inverse; ``consistent=False`` ignores the order."""

    def __init__(self, consistent: bool = True) -> None:
        super().__init__()
        self.consistent = consistent

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shift = 10 * (image[:, 0].mean() - image[:, 1].mean())
        ddf = torch.zeros(image.shape[0], 3, *image.shape[2:], dtype=image.dtype)
        ddf[:, 2] = shift if self.consistent else shift.abs()
        return ddf


def test_symmetric_adds_the_inverse_of_the_swapped_registration():
    image = pair(batch=1).double()
    image[:, 0] += 0.1  # moving brighter: a translation of +1 voxel moving -> fixed
    with torch.no_grad():
        consistent = _Translation()
        plain = consistent(image)
        assert plain[0, 2].mean() > 0.5
        # an inverse-consistent network: the inverse of fixed -> moving is moving -> fixed, nothing changes
        got = RegistrationTestTimeInferer(symmetric=True)(image, consistent)
        assert torch.allclose(got, plain, rtol=0, atol=1e-9)
        # one that is not: the mean of its field and the inverse of the other direction's
        inconsistent = _Translation(consistent=False)
        got = RegistrationTestTimeInferer(symmetric=True)(image, inconsistent)
        assert torch.allclose(got, torch.zeros_like(got), atol=1e-9)  # (+t + -t) / 2
        # with a real network: the swapped pass really runs (the result moves away from the plain field)
        net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.3).double().eval()
        both = RegistrationTestTimeInferer(symmetric=True)(image, net)
        assert (both - net(image)).abs().max() > 0.05


class _Threshold(torch.nn.Module):
    """A segmenter of two classes, float32: foreground where the image is brighter than 0.5."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.inputs = []

    def forward(self, x):
        self.inputs.append((x.shape, x.dtype, torch.is_grad_enabled()))
        return torch.cat([torch.zeros_like(x), self.scale * (x - 0.5)], 1)


@pytest.mark.parametrize(
    "options",
    [
        {"flips": "all"},
        {"steps": 30, "lr": 1.0},
        {"steps": 10, "lr": 0.5, "grid": 2, "similarity": "mse"},
        {"steps": 30, "lr": 1.0, "similarity": "dice", "segmenter": _Threshold()},
    ],
    ids=["flips", "optimised", "optimised-coarse-mse", "optimised-dice"],
)
def test_test_time_options_keep_the_gradient_positive(options):
    # heads with large weights: logits far from 0, g close to the bounds 0 and 2; a large learning rate.
    # In float64: in float32 a g below ~1e-6 is lost in the rounding of the integrated field, for the
    # plain network's output too.
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=1.0).double().eval()
    other = randomise_heads(SpatialGradientRegNet(**SMALL), scale=1.0, seed=7).double().eval()
    with torch.no_grad():
        ddf = RegistrationTestTimeInferer(members=[other], **options)(pair(batch=1).double(), net)
        assert ddf_to_gradient(net(pair(batch=1).double())).amin() < 1e-3  # near the bound
    g = ddf_to_gradient(ddf)
    # index 0 of a flipped field is its far border's sample, not a difference: the interior only
    assert ddf.abs().max() > 1 and (g[..., 1:, 1:, 1:] > 0).all(), float(g.min())


def test_instance_optimisation_starts_from_the_network_and_improves_the_similarity():
    image = _moved_pair()
    net = SpatialGradientRegNet(**SMALL).eval()  # the identity: nothing registered yet
    loss = LocalNCCLoss()
    with torch.no_grad():
        plain = RegistrationInferer()(image, net)
        # no step size: the result is the network's field (through logit and sigmoid: rounding only)
        still = RegistrationTestTimeInferer(steps=5, lr=0.0)(image, net)
        assert (still - plain).abs().max() < 1e-5
        moved = RegistrationTestTimeInferer(steps=60, lr=0.1, smooth_weight=0.01)(image, net)
    before = loss(image[:, :1], image[:, 1:])
    after = loss(warp_image(image[:, :1], moved), image[:, 1:])
    assert after < 0.6 * before, (float(before), float(after))
    # moving(x) = fixed(x - 2): the translation is found in the interior, about +2 voxels along the last
    # axis, little along the others
    inner = moved[0, :, 4:-4, 4:-4, 8:-8]
    assert 1.4 < float(inner[2].median()) < 2.6 and inner[:2].abs().median() < 0.3, inner.median()
    assert not moved.requires_grad


def test_segmentation_guided_optimisation_aligns_the_predicted_labels():
    image = _moved_pair().double()
    net = SpatialGradientRegNet(**SMALL).double().eval()  # the identity: nothing registered yet
    segmenter = _Threshold()
    with torch.no_grad():
        plain = RegistrationInferer()(image, net)
        still = RegistrationTestTimeInferer(steps=5, lr=0.0, similarity="dice", segmenter=segmenter)(image, net)
        assert (still - plain).abs().max() < 1e-9
        segmenter.inputs.clear()
        moved = RegistrationTestTimeInferer(steps=60, lr=0.1, similarity="dice", segmenter=segmenter)(image, net)
    # each image labelled once per pair, one channel at a time, in the segmenter's dtype, without autograd
    assert segmenter.inputs == [((1, 1, 16, 16, 32), torch.float32, False)] * 2
    labels = torch.sigmoid(20 * (image.float() - 0.5)).double()
    dice = DiceLoss(batch=True, smooth_nr=0.0, smooth_dr=1e-6)
    # soft maps: the loss of the fixed map against itself (0.30) is where aligned maps get; 0.42 before
    floor, before = dice(labels[:, 1:], labels[:, 1:]), dice(labels[:, :1], labels[:, 1:])
    after = dice(warp_image(labels[:, :1], moved), labels[:, 1:])
    assert after < floor + 0.1 * (before - floor), (float(floor), float(before), float(after))
    # the translation (+2 voxels along the last axis) is found; labels leave motion along their edges free,
    # so less of it along the others than in the interior of an image (median 0.35 voxels here)
    inner = moved[0, :, 4:-4, 4:-4, 8:-8]
    assert 1.4 < float(inner[2].median()) < 2.6 and inner[:2].abs().median() < 0.5, inner.median()
    g = ddf_to_gradient(moved)
    assert (g[..., 1:, 1:, 1:] > 0).all() and not moved.requires_grad


def test_field_smoothing_is_the_last_step_and_keeps_the_gradient_positive():
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=1.0).double().eval()
    image = pair(batch=1).double()
    with torch.no_grad():
        plain = RegistrationInferer()(image, net)
        got = RegistrationTestTimeInferer(sigma=1.0)(image, net)
        flipped = RegistrationTestTimeInferer(flips=[[0]], sigma=0.75)(image, net)
        flipped_plain = RegistrationTestTimeInferer(flips=[[0]])(image, net)
    assert torch.allclose(got, smooth_ddf(plain, 1.0), rtol=0, atol=1e-12) and (got - plain).abs().max() > 0.1
    assert torch.allclose(flipped, smooth_ddf(flipped_plain, 0.75), rtol=0, atol=1e-12)
    assert ddf_to_gradient(plain).amin() < 1e-2 and (ddf_to_gradient(got)[..., 1:, 1:, 1:] > 0).all()


def test_refinement_passes_register_the_warped_image_again_and_compose():
    net = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.3).double().eval()
    image = pair(batch=1).double()
    with torch.no_grad():
        first = RegistrationInferer()(image, net)
        moved = warp_image(image[:, :1], first)
        second = RegistrationInferer()(torch.cat([moved, image[:, 1:]], 1), net)
        assert torch.equal(RegistrationTestTimeInferer(passes=1)(image, net), first)
        got = RegistrationTestTimeInferer(passes=2)(image, net)
        three = RegistrationTestTimeInferer(passes=3)(image, net)
    assert torch.allclose(got, compose_ddf(first, second), rtol=0, atol=1e-12)
    assert (got - first).abs().max() > 0.1 and (three - got).abs().max() > 0.01
    # a network that predicts the identity stays the identity however many passes
    still = randomise_heads(SpatialGradientRegNet(**SMALL), scale=0.0).double().eval()
    with torch.no_grad():
        assert RegistrationTestTimeInferer(passes=3)(image, still).abs().max() < 1e-12


def test_test_time_option_errors():
    with pytest.raises(ValueError, match="passes .* positive integer"):
        RegistrationTestTimeInferer(passes=0)
    with pytest.raises(ValueError, match="flips must be 'all'"):
        RegistrationTestTimeInferer(flips="some")
    with pytest.raises(ValueError, match="spatial axes 0, 1, 2"):
        RegistrationTestTimeInferer(flips=[[3]])
    with pytest.raises(ValueError, match="similarity must be"):
        RegistrationTestTimeInferer(steps=1, similarity="mi")
    with pytest.raises(ValueError, match="needs a segmenter .*--io_seg_ckpt.* got similarity 'dice' with no"):
        RegistrationTestTimeInferer(steps=1, similarity="dice")
    with pytest.raises(ValueError, match="got similarity 'lncc' with a segmenter"):
        RegistrationTestTimeInferer(steps=1, segmenter=_Threshold())
    with pytest.raises(ValueError, match="grid must be at least 1"):
        RegistrationTestTimeInferer(steps=1, grid=0)
    with pytest.raises(ValueError, match="sigma .* must not be negative"):
        RegistrationTestTimeInferer(sigma=-0.5)
