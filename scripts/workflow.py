"""Iteration functions that plug the pair registration step into MONAI's Ignite engines.

MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` assume one input and one target; a
registration pair has two images and two label maps, and the loss reports several terms. These
callables are passed as ``iteration_update`` and keep everything else (handlers, metrics, DDP,
checkpoints, events) MONAI's. Like MONAI's own iterations they set ``engine.state.output`` and
fire ``IterationEvents``; MONAI decollates the batch and runs ``postprocessing`` on
``MODEL_COMPLETED``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.networks.utils import one_hot
from monai.utils import set_determinism

from scripts.deformation import warp_image, warp_labels_nearest

__all__ = ["EpochSeed", "RegistrationEvalStep", "RegistrationTrainStep", "SegmentationTrainStep", "lr_lambda", "pair_to_device"]

PAIR_KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label")


def pair_to_device(batch: dict, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors of a collated pair batch, on ``device``; images as float, labels as they are."""
    out = {}
    for k in PAIR_KEYS:
        if k in batch:
            v = torch.as_tensor(batch[k]).to(device)
            out[k] = v.float() if k.endswith("image") else v
    return out


class RegistrationTrainStep:
    """One optimisation step on a batch of pairs with the symmetric loss.

    The engine's ``loss_function`` must provide ``terms(pred, batch) -> dict`` (see
    ``scripts.losses.SymmetricRegistrationLoss``). The engine output is a dict of detached scalars:
    ``loss`` (the weighted total) and each term (``sim``, ``smooth`` and, with labels, ``dice``).
    """

    def __call__(self, engine: Engine, batchdata: dict) -> dict[str, float]:
        batch = pair_to_device(batchdata, engine.state.device)
        image = torch.cat([batch["moving_image"], batch["fixed_image"]], dim=1)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=torch.device(engine.state.device).type, enabled=engine.amp):
            pred = engine.inferer(image, engine.network)
            terms = engine.loss_function.terms(pred, batch)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(terms["loss"]).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms["loss"].backward()
            engine.optimizer.step()
        engine.state.output = {k: v.item() for k, v in terms.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class RegistrationEvalStep:
    """Registers a batch of pairs moving -> fixed and warps the moving labels (nearest neighbour).

    Engine output (batched, before MONAI decollates it): ``pred`` the warped moving label map and
    ``label`` the fixed label map, both one-hot (B, num_labels, H, W, D), ready for MONAI's
    ``MeanDice`` / ``HausdorffDistance`` handlers; ``ddf`` (B, 3, H, W, D) in voxels; and
    ``moving_image``, ``fixed_image``, ``warped_image`` (B, C, H, W, D) for pictures;
    ``seconds`` (B,) the network + integration time per pair (the batch time divided by B);
    with ``inverse``, also ``ddf_inverse`` (B, 3, H, W, D), the fixed->moving field on the moving grid.

    Args:
        num_labels: classes including background.
        inverse: also predict the fixed->moving field (the same network with the images swapped).
    """

    def __init__(self, num_labels: int, inverse: bool = False) -> None:
        self.num_labels = int(num_labels)
        self.inverse = bool(inverse)

    @staticmethod
    def _ddf(engine: Engine, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        image = torch.cat([moving, fixed], dim=1)
        with torch.no_grad(), torch.autocast(device_type=torch.device(engine.state.device).type, enabled=engine.amp):
            return engine.inferer(image, engine.network).float()

    def __call__(self, engine: Engine, batchdata: dict) -> dict[str, torch.Tensor]:
        batch = pair_to_device(batchdata, engine.state.device)
        moving, fixed = batch["moving_image"], batch["fixed_image"]
        engine.network.eval()
        start = time.perf_counter()
        ddf = self._ddf(engine, moving, fixed)
        seconds = (time.perf_counter() - start) / moving.shape[0]
        out = {
            "ddf": ddf,
            "seconds": torch.full((moving.shape[0],), seconds),
            "moving_image": batch["moving_image"],
            "fixed_image": batch["fixed_image"],
            "warped_image": warp_image(batch["moving_image"], ddf),
        }
        if "moving_label" in batch and "fixed_label" in batch:
            warped = warp_labels_nearest(batch["moving_label"].long(), ddf)
            out["pred"] = one_hot(warped, self.num_labels)
            out["label"] = one_hot(batch["fixed_label"].long(), self.num_labels)
        if self.inverse:
            out["ddf_inverse"] = self._ddf(engine, fixed, moving)
        engine.state.output = out
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class SegmentationTrainStep:
    """One optimisation step of the segmentation network on partially-labelled cohorts: the loss
    (``scripts.losses.PartialLabelDiceLoss``) also takes the batch's ``mask`` (B, classes), the
    organs each sample's cohort annotates, which MONAI's default step cannot pass."""

    def __call__(self, engine: Engine, batchdata: dict) -> dict[str, float]:
        device = engine.state.device
        image = torch.as_tensor(batchdata["image"]).to(device).float()
        label = torch.as_tensor(batchdata["label"]).to(device)
        mask = torch.as_tensor(batchdata["mask"]).to(device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=torch.device(device).type, enabled=engine.amp):
            logits = engine.inferer(image, engine.network)
            loss = engine.loss_function(logits, label, mask)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        engine.state.output = {"loss": loss.item()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def lr_lambda(schedule: str, max_epochs: int, final_ratio: float = 0.01):
    """The learning-rate factor per epoch for ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per
    epoch by MONAI's ``LrScheduleHandler``): epoch e (0-based) trains at ``learning_rate * f(e)``.

    - ``"constant"``: f = 1.
    - ``"cosine"``: from 1 at the first epoch down to ``final_ratio`` at epoch ``max_epochs``, along a
      half cosine.

    A plain function, not a callable object, so ``LambdaLR.state_dict`` does not store it: a run
    resumed with another ``--max_epochs`` follows the new schedule from the epoch it resumes at.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    last, ratio = max(int(max_epochs) - 1, 1), float(final_ratio)

    def factor(epoch: int) -> float:
        if schedule == "constant":
            return 1.0
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(epoch, last) / last))

    return factor


class EpochSeed:
    """Reseeds the training data pipeline at the start of every epoch from (seed, epoch, rank), so that
    epoch N draws the same pairs, order and augmentation whether the run started at epoch 1 or was
    resumed from ``checkpoint_epoch=N-1.pt``.

    Without it the random state at epoch N is whatever epochs 1..N-1 left behind (the pair sampler
    and augmentation of ``RandomPairDataset`` are seeded once when the DataLoader is built, the
    shuffling order and the worker seeds come from torch's global generator), and a resumed run
    starts again from the state of epoch 1: same seed, different weights.

    At ``EPOCH_STARTED`` it seeds torch / numpy / random (``monai.utils.set_determinism``), reseeds
    the dataset's randomizable parts in the main process (``set_rnd``, as MONAI's DataLoader does
    once for ``num_workers=0``) and rebuilds the data iterator (``engine.set_data``), so the shuffled
    order and the per-worker seeds are drawn from the reseeded generator (Ignite builds the next
    epoch's iterator, and starts its workers, at the end of the previous epoch). Checkpoints must be
    taken at epoch boundaries (``CheckpointSaver`` with ``save_interval`` epochs, as train.json does).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def epoch_seed(self, epoch: int) -> int:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return int(np.random.SeedSequence([self.seed, int(epoch), rank]).generate_state(1)[0])

    def __call__(self, engine: Engine) -> None:
        seed = self.epoch_seed(engine.state.epoch)
        set_determinism(seed=seed)
        loader = engine.state.dataloader
        if loader is None:
            return
        if getattr(loader, "dataset", None) is not None:
            set_rnd(loader.dataset, seed)
        engine.set_data(loader)
