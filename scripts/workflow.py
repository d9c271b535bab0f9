"""The pieces that plug pair registration into MONAI's Ignite engines.

Training uses ``SupervisedTrainer``'s own iteration (AMP, gradient accumulation and every Ignite
event included): ``PreparePair`` turns a collated pair batch into the network input and the loss
targets, and the loss takes ``(pred, targets)``. Evaluation needs two images in, a warped label map
and a displacement field out: ``RegistrationEvalStep`` is the evaluator's ``iteration_update``; like
MONAI's own iterations it sets ``engine.state.output`` and fires ``IterationEvents``, and MONAI then
decollates the batch and runs ``postprocessing`` on ``MODEL_COMPLETED``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.networks.utils import one_hot
from monai.utils import set_determinism

from scripts.deformation import warp_image, warp_labels_nearest

__all__ = ["EpochSeed", "PrepareMasked", "PreparePair", "RegistrationEvalStep", "lr_lambda", "pair_to_device"]

PAIR_KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label")


def pair_to_device(batch: dict, device, non_blocking: bool = False, meta: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a collated pair batch, on ``device``; images as float, labels as they are.
    ``meta=False`` drops MONAI's metadata (plain tensors: no per-operation bookkeeping in training)."""
    out = {}
    for k in PAIR_KEYS:
        if k in batch:
            v = torch.as_tensor(batch[k]).to(device, non_blocking=non_blocking)
            if not meta and isinstance(v, MetaTensor):
                v = v.as_tensor()
            out[k] = v.float() if k.endswith("image") else v
    return out


class PreparePair:
    """``prepare_batch`` of ``SupervisedTrainer`` for pairs: returns ``(inputs, targets)`` with
    ``inputs`` = [moving, fixed] concatenated on channels (B, 2C, H, W, D), the network input, and
    ``targets`` = the pair's images and label maps on the device (the dict
    ``scripts.losses.SymmetricRegistrationLoss`` takes as its second argument)."""

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        targets = pair_to_device(batchdata, device, non_blocking, meta=False)
        return torch.cat([targets["moving_image"], targets["fixed_image"]], dim=1), targets


class PrepareMasked:
    """``prepare_batch`` of ``SupervisedTrainer`` for the segmentation network on partially-labelled
    cohorts: ``(image, {"label", "mask"})``, where ``mask`` (B, classes) says which organs each
    sample's cohort annotates (``scripts.losses.PartialLabelDiceLoss`` takes this dict as target)."""

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        def to(key: str) -> torch.Tensor:
            value = torch.as_tensor(batchdata[key])
            return (value.as_tensor() if isinstance(value, MetaTensor) else value).to(device, non_blocking=non_blocking)

        return to("image").float(), {"label": to("label"), "mask": to("mask")}


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: read the clock only once they are done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _like(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` with the metadata of ``reference`` (its affine, file name and applied pads), so that
    postprocessing can put it back on the reference image's own grid and save it."""
    if not isinstance(reference, MetaTensor):
        return values
    out = MetaTensor(values.as_tensor() if isinstance(values, MetaTensor) else values)
    out.copy_meta_from(reference)
    return out


class RegistrationEvalStep:
    """Registers a batch of pairs moving -> fixed and warps the moving labels (nearest neighbour).

    Engine output (batched, before MONAI decollates it):

    - ``ddf`` (B, 3, H, W, D): the displacement in voxels on the (padded) fixed grid;
    - ``warped_image`` (B, C, H, W, D) and, with labels, ``warped_label`` (B, 1, H, W, D) integer;
      these three carry the fixed image's metadata;
    - with labels, ``pred`` (the warped moving label map) and ``label`` (the fixed one), one-hot
      (B, num_labels, H, W, D), for MONAI's ``MeanDice`` / ``HausdorffDistance`` handlers;
    - ``moving_image``, ``fixed_image`` as given;
    - ``seconds`` (B,): network + integration time per pair (the batch time divided by B);
    - with ``fixed_to_moving``, ``ddf_fixed_to_moving`` (B, 3, H, W, D): the same network with the
      images swapped (the fixed->moving field, on the moving grid; not the inverse of ``ddf``),
      carrying the moving image's metadata.

    A displacement with NaN or infinite values (diverged or corrupt weights) stops the run with an
    error naming the pairs, before anything of them is written.

    Args:
        num_labels: classes including background.
        fixed_to_moving: also predict the fixed->moving field.
    """

    def __init__(self, num_labels: int, fixed_to_moving: bool = False) -> None:
        self.num_labels = int(num_labels)
        self.fixed_to_moving = bool(fixed_to_moving)

    @staticmethod
    def _ddf(engine: Engine, moving: torch.Tensor, fixed: torch.Tensor, what: str, batchdata: dict) -> torch.Tensor:
        image = torch.cat([moving, fixed], dim=1)
        with torch.no_grad(), torch.autocast(device_type=torch.device(engine.state.device).type, enabled=engine.amp):
            ddf = engine.inferer(image, engine.network).float()
        if not torch.isfinite(ddf).all():
            pairs = ", ".join(
                f"fixed {f} / moving {m}"
                for f, m in zip(batchdata.get("fixed_id", "?"), batchdata.get("moving_id", "?"), strict=False)
            )
            raise FloatingPointError(
                f"the network predicted a {what} displacement with NaN or infinite values for {pairs}: the weights are "
                "corrupt or diverged (check the checkpoint); nothing was written for these pairs"
            )
        return ddf

    def __call__(self, engine: Engine, batchdata: dict) -> dict[str, torch.Tensor]:
        device = torch.device(engine.state.device)
        batch = pair_to_device(batchdata, device)
        moving, fixed = batch["moving_image"], batch["fixed_image"]
        engine.network.eval()
        _sync(device)
        start = time.perf_counter()
        ddf = self._ddf(engine, moving, fixed, "moving->fixed", batchdata)
        _sync(device)
        seconds = (time.perf_counter() - start) / moving.shape[0]
        out = {
            "ddf": _like(fixed, ddf),
            "seconds": torch.full((moving.shape[0],), seconds),
            "moving_image": moving,
            "fixed_image": fixed,
            "warped_image": _like(fixed, warp_image(moving, ddf)),
        }
        if "moving_label" in batch and "fixed_label" in batch:
            warped = warp_labels_nearest(batch["moving_label"].long(), ddf)
            out["warped_label"] = _like(fixed, warped)
            out["pred"] = one_hot(warped, self.num_labels)
            out["label"] = one_hot(batch["fixed_label"].long(), self.num_labels)
        if self.fixed_to_moving:
            out["ddf_fixed_to_moving"] = _like(moving, self._ddf(engine, fixed, moving, "fixed->moving", batchdata))
        engine.state.output = out
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
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
