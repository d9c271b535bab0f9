"""Tests of scripts/workflow.py: the pair steps inside real MONAI SupervisedTrainer /
SupervisedEvaluator, and the learning-rate schedule."""

import math

import numpy as np
import pytest
import torch
from conftest import smooth_volume
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import MeanDice, from_engine

from scripts.data import PairDataset, RandomPairDataset
from scripts.losses import SymmetricRegistrationLoss
from scripts.networks import SpatialGradientRegNet
from scripts.workflow import PrepareMasked, PreparePair, RegistrationEvalStep, lr_lambda


def test_constant_schedule():
    f = lr_lambda("constant", 10)
    assert [f(e) for e in range(10)] == [1.0] * 10


def test_cosine_schedule_from_one_to_the_final_ratio():
    f = lr_lambda("cosine", 11, final_ratio=0.01)
    values = [f(e) for e in range(11)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.01)
    assert values[5] == pytest.approx(0.01 + 0.99 * 0.5)  # half way: the mean of both ends
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert f(20) == pytest.approx(0.01)  # past max_epochs it stays at the floor
    assert values[2] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_cosine_with_lambdalr_steps_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 3, final_ratio=0.1))
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5 * 0.55, 0.05])
    # the schedule function is not stored: a resumed run follows its own --max_epochs
    assert sched.state_dict()["lr_lambdas"] == [None]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda("step", 10)


# --------------------------------------------------------------------------- the pair steps in MONAI engines
SHAPE = (16, 16, 32)  # divisible by 16, and > 1 voxel at the bottleneck for training-mode instance norm


def image_cases(n, with_labels=True):
    cases = []
    for i in range(n):
        img = smooth_volume(SHAPE, seed=i)[None]
        case = {"image": img}
        if with_labels:
            case["label"] = np.digitize(img, [0.4, 0.6]).astype(np.int64)  # labels 0, 1, 2
        cases.append(case)
    return cases


def tiny_net():
    return SpatialGradientRegNet(channels=(4, 8, 16, 32, 64))


@pytest.mark.parametrize("with_labels", [True, False])
def test_train_step_in_supervised_trainer(with_labels):
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(RandomPairDataset(image_cases(3, with_labels)).set_random_state(seed=0), batch_size=2)
    loss = SymmetricRegistrationLoss(similarity="lncc", lncc_kernel_size=5)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=loss,
        prepare_batch=PreparePair(),
        decollate=False,
    )
    events = []
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, name=event.name: events.append(name))
    trainer.run()
    assert trainer.state.iteration == 2
    # MONAI's own iteration: every Ignite event fires, once per iteration
    assert events == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED"] * 2
    out = trainer.state.output
    assert out["image"].shape[1:] == (2, *SHAPE)  # [moving, fixed] on channels
    assert set(out["pred"]) == {"grad_mf", "grad_fm"}
    expected = {"loss", "sim", "smooth", "dice"} if with_labels else {"loss", "sim", "smooth"}
    assert set(loss.last_terms) == expected  # what train.json logs
    for k, v in loss.last_terms.items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)
    assert loss.last_terms["loss"] == pytest.approx(out["loss"].item())
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "head.bias" in changed


def test_eval_step_with_mean_dice_is_one_at_identity():
    cases = image_cases(2)
    pairs = [
        {
            "moving_image": cases[0]["image"],
            "fixed_image": cases[1]["image"],
            "moving_label": cases[0]["label"],
            "fixed_label": cases[0]["label"].copy(),
        },
        {
            "moving_image": cases[1]["image"],
            "fixed_image": cases[0]["image"],
            "moving_label": cases[1]["label"],
            "fixed_label": cases[1]["label"].copy(),
        },
    ]
    loader = DataLoader(PairDataset(pairs, transform=lambda c: c), batch_size=2)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=tiny_net(),
        iteration_update=RegistrationEvalStep(num_labels=3),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    assert evaluator.state.metrics["dice"] == pytest.approx(1.0)
    # not trivially 1: with the other case's label map as the fixed labels it is lower
    for p, other in zip(pairs, (cases[1], cases[0]), strict=True):
        p["fixed_label"] = other["label"]
    evaluator.run()
    assert evaluator.state.metrics["dice"] < 0.9
    out = evaluator.state.output
    first = out[0] if isinstance(out, list) else out
    assert tuple(first["ddf"].shape[-4:]) == (3, *SHAPE)
    assert torch.count_nonzero(first["ddf"]) == 0


def test_eval_step_fixed_to_moving_is_the_swapped_pair():
    net = tiny_net()
    with torch.no_grad():
        for head in [net.head, *net.ds_heads]:
            head.weight.normal_(0, 0.05)
    cases = image_cases(2, with_labels=False)
    pairs = [{"moving_image": cases[0]["image"], "fixed_image": cases[1]["image"]}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(PairDataset(pairs, transform=lambda c: c), batch_size=1),
        network=net,
        iteration_update=RegistrationEvalStep(num_labels=3, fixed_to_moving=True),
    )
    evaluator.run()
    out = evaluator.state.output
    out = out[0] if isinstance(out, list) else out
    m, f = torch.from_numpy(cases[0]["image"])[None], torch.from_numpy(cases[1]["image"])[None]
    with torch.no_grad():
        net.eval()
        expected_fwd, expected_inv = net(torch.cat([m, f], 1)), net(torch.cat([f, m], 1))
    assert torch.allclose(out["ddf"].reshape(expected_fwd.shape), expected_fwd, atol=1e-5)
    assert torch.allclose(out["ddf_fixed_to_moving"].reshape(expected_inv.shape), expected_inv, atol=1e-5)
    assert not torch.allclose(expected_fwd, expected_inv, atol=1e-3)
    assert "pred" not in out  # no labels, no Dice inputs


def test_prepare_masked_gives_the_partial_label_loss_its_mask():
    from scripts.losses import PartialLabelDiceLoss

    batch = {
        "image": torch.rand(2, 1, 8, 8, 8),
        "label": torch.randint(0, 3, (2, 1, 8, 8, 8)),
        "mask": torch.tensor([[0, 1, 0], [0, 1, 1]], dtype=torch.float32),
    }
    image, target = PrepareMasked()(batch, torch.device("cpu"))
    assert image.dtype == torch.float32 and set(target) == {"label", "mask"}
    logits = torch.randn(2, 3, 8, 8, 8)
    loss = PartialLabelDiceLoss()
    assert torch.equal(loss(logits, target), loss(logits, batch["label"], batch["mask"]))
