"""scripts/widening.py: a wider network built from a narrower checkpoint predicts the same deformation
(eval and training outputs, every head), its duplicated channels get different gradients (training can
separate them), and what cannot be widened is refused, naming the tensor, before anything is written."""

from __future__ import annotations

import pytest
import torch

from scripts.networks import SpatialGradientRegNet
from scripts.widening import widen_state_dict
from tests.test_tooling import ok, run

ARCH = {"encoder_convs": (1, 1), "decoder_convs": (2, 1)}


def net(channels, seed: int = 0, **kw) -> SpatialGradientRegNet:
    """A small network with random weights everywhere, heads included (zero heads would make every
    network predict the identity)."""
    torch.manual_seed(seed)
    n = SpatialGradientRegNet(channels=channels, **{**ARCH, "deep_supervision": False, **kw})
    with torch.no_grad():
        for p in n.parameters():
            p.normal_(0, 0.3)
    return n


def pair(seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool3d(torch.rand(2, 2, size, size, size, generator=g), 3, 1, 1)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_widened_network_predicts_the_same_deformation(factor, deep_supervision):
    narrow = net((4, 8, 16), deep_supervision=deep_supervision)
    wide = SpatialGradientRegNet(
        channels=(4 * factor, 8 * factor, 16 * factor), **ARCH, deep_supervision=deep_supervision
    )
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), wide, noise=0.1, seed=0))
    x = pair()
    with torch.no_grad():
        ddf_n, ddf_w = narrow.eval()(x), wide.eval()(x)
        train_n, train_w = narrow.train()(x), wide.train()(x)
    assert ddf_n.abs().max() > 0.1  # a non-trivial field, so equality means something
    assert torch.allclose(ddf_n, ddf_w, atol=1e-4), (ddf_n - ddf_w).abs().max()
    for key in ("grad_mf", "grad_fm"):  # both directions, every deep-supervision head
        assert train_n[key].shape == train_w[key].shape
        assert torch.allclose(train_n[key], train_w[key], atol=1e-4), (key, (train_n[key] - train_w[key]).abs().max())
    # the weights really are wider, and the copies are not plain halves (the shares are random)
    w = wide.state_dict()["encoder.in_conv2.conv.weight"]
    assert w.shape[:2] == (4 * factor, 4 * factor)
    assert not torch.allclose(w[:, 0], w[:, 1])


def test_new_deep_supervision_heads_keep_the_final_output_and_start_at_the_identity():
    narrow = net((4, 8, 16))
    wide = SpatialGradientRegNet(channels=(8, 16, 32), **ARCH, deep_supervision=True)
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), wide))
    x = pair(1)
    with torch.no_grad():
        g_n, g_w = narrow.train()(x)["grad_mf"], wide.train()(x)["grad_mf"]
    assert g_w.shape[1] == 3 and g_n.shape[1] == 1
    assert torch.allclose(g_w[:, 0], g_n[:, 0], atol=1e-4)
    assert torch.equal(g_w[:, 1:], torch.ones_like(g_w[:, 1:]))  # zero heads: g = 1


def test_copies_of_a_channel_receive_different_gradients():
    narrow = net((4, 8, 16))
    wide = SpatialGradientRegNet(channels=(8, 16, 32), **ARCH, deep_supervision=False)
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), wide, noise=0.1))
    out = wide.train()(pair(2))["grad_mf"]
    out.square().mean().backward()
    grad = wide.encoder.in_conv2.conv.weight.grad  # output channels 2c and 2c + 1 are copies of channel c
    assert not torch.allclose(grad[0], grad[1])
    # without noise the copies would stay identical forever: equal shares, equal gradients
    wide0 = SpatialGradientRegNet(channels=(8, 16, 32), **ARCH, deep_supervision=False)
    wide0.load_state_dict(widen_state_dict(narrow.state_dict(), wide0, noise=0.0))
    wide0.train()(pair(2))["grad_mf"].square().mean().backward()
    grad0 = wide0.encoder.in_conv2.conv.weight.grad
    assert torch.allclose(grad0[0], grad0[1], atol=1e-7)


def test_what_cannot_be_widened_is_refused_naming_the_tensor():
    narrow = net((4, 8, 16)).state_dict()
    with pytest.raises(ValueError, match=r"encoder\.down\.0\.0\.conv\.weight"):  # 8 -> 12 is not x2
        widen_state_dict(narrow, SpatialGradientRegNet(channels=(8, 12, 32), **ARCH))
    with pytest.raises(ValueError, match="different factors"):
        widen_state_dict(narrow, SpatialGradientRegNet(channels=(8, 24, 48), **ARCH))
    with pytest.raises(ValueError, match="more than width"):
        widen_state_dict(
            narrow, SpatialGradientRegNet(channels=(8, 16, 32), encoder_convs=(2, 1), decoder_convs=(2, 1))
        )
    with pytest.raises(ValueError, match="shares stay positive"):
        widen_state_dict(narrow, SpatialGradientRegNet(channels=(8, 16, 32), **ARCH), noise=0.5)


def test_command_line_writes_an_equivalent_checkpoint_or_nothing(tmp_path):
    """The shipped architecture (configs/inference.json), widened x2 with deep supervision, through the CLI."""
    config = dict(channels=(4, 8, 16, 32, 64), deep_supervision=False)
    narrow = SpatialGradientRegNet(**config)
    with torch.no_grad():
        for p in narrow.parameters():
            p.normal_(0, 0.2)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    out = tmp_path / "w" / "wide.pt"
    result = run(
        "-m",
        "scripts.widening",
        str(tmp_path / "narrow.pt"),
        "--out",
        str(out),
        "--channels",
        "[8, 16, 32, 64, 128]",
        "--deep_supervision",
        "True",
    )
    ok(result)
    assert "widened x2" in result.stdout
    state = torch.load(out, weights_only=True)
    assert state["encoder.in_conv1.conv.weight"].shape[0] == 8 and any(k.startswith("ds_heads.") for k in state)
    # refused: not a multiple; nothing written
    bad = tmp_path / "w" / "bad.pt"
    result = run(
        "-m", "scripts.widening", str(tmp_path / "narrow.pt"), "--out", str(bad), "--channels", "[8, 12, 32, 64, 128]"
    )
    assert result.returncode == 1 and "narrow.pt" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not bad.exists()
