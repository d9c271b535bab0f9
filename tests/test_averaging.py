"""scripts/averaging.py: the tensor-wise mean of checkpoints, written atomically with normal
permissions; checkpoints of another architecture, non-checkpoints and bad ``--out`` refused before
anything is written."""

from __future__ import annotations

import os
import stat

import numpy as np
import torch

from scripts.averaging import average, main
from scripts.networks import SpatialGradientRegNet
from scripts.weights import load_pretrained
from tests.test_tooling import ok, run


def net(seed: int, **kw) -> SpatialGradientRegNet:
    """A small network with random (non-zero) weights."""
    torch.manual_seed(seed)
    n = SpatialGradientRegNet(
        **{"channels": (4, 8), "encoder_convs": (1,), "decoder_convs": (1,), "deep_supervision": False, **kw}
    )
    with torch.no_grad():
        for p in n.parameters():
            p.normal_()
    return n


def test_average_is_the_tensorwise_mean_and_refuses_other_architectures(tmp_path):
    a, b = net(0), net(1)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    # a resumable checkpoint and DDP prefixes are read as load_pretrained reads them
    torch.save({"model": {"module." + k: v for k, v in b.state_dict().items()}, "optimizer": {}}, tmp_path / "b.pt")
    out = tmp_path / "avg" / "mean.pt"
    ok(run("-m", "scripts.averaging", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(out)))
    mean = load_pretrained(net(2), str(out)).state_dict()
    for k, v in a.state_dict().items():
        assert torch.allclose(mean[k], (v + b.state_dict()[k]) / 2, atol=1e-6), k
    assert not torch.allclose(mean["head.weight"], a.state_dict()["head.weight"])
    assert sorted(os.listdir(out.parent)) == ["mean.pt"], "temporary file left behind"

    torch.save(net(3, channels=(4, 16)).state_dict(), tmp_path / "c.pt")
    bad = tmp_path / "bad.pt"
    proc = run("-m", "scripts.averaging", str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), "--out", str(bad))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{tmp_path / 'c.pt'}: holds other tensors or shapes than {tmp_path / 'a.pt'}" in proc.stderr
    assert not bad.exists() and sorted(os.listdir(tmp_path)) == ["a.pt", "avg", "b.pt", "c.pt"]


def test_averaged_checkpoint_gets_the_umask_permissions(tmp_path):
    for i in range(2):
        torch.save(net(i).state_dict(), tmp_path / f"{i}.pt")
    old = os.umask(0o027)  # neither the common 0o022 nor mkstemp's private 0o600 would give 0o640
    try:
        average(str(tmp_path / "0.pt"), str(tmp_path / "1.pt"), out=str(tmp_path / "avg.pt"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "avg.pt").stat().st_mode) == 0o640


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, capsys):
    torch.save(net(0).state_dict(), tmp_path / "a.pt")
    torch.save(net(1).state_dict(), tmp_path / "b.pt")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save({"step": torch.tensor([1])}, tmp_path / "step1.pt")
    torch.save({"step": torch.tensor([2])}, tmp_path / "step2.pt")
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out.pt"
    out.write_bytes(b"an earlier result")
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    cases = [
        ([a, "--out", str(out)], "averaging needs at least two checkpoints"),
        ([a, str(tmp_path / "random.pt"), "--out", str(out)], f"{tmp_path / 'random.pt'}: not a PyTorch checkpoint"),
        ([a, str(tmp_path / "missing.pt"), "--out", str(out)], f"{tmp_path / 'missing.pt'}: checkpoint not found"),
        (
            [str(tmp_path / "step1.pt"), str(tmp_path / "step2.pt"), "--out", str(out)],
            f"{tmp_path / 'step2.pt'}: its non-float tensor step differs",
        ),
        ([a, b, "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        ([a, b, "--out", str(tmp_path / "file" / "avg.pt")], f"output folder {tmp_path / 'file'} is a file"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert out.read_bytes() == b"an earlier result"
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt", "file", "out.pt", "random.pt", "step1.pt", "step2.pt"]
    # Non-float tensors that agree are kept as they are.
    assert main([str(tmp_path / "step1.pt"), str(tmp_path / "step1.pt"), "--out", str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["step"], torch.tensor([1]))
