"""Iteration functions that plug the pair registration step into MONAI's Ignite engines.

MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` assume one input and one target; a
registration pair has two images and two label maps, and the loss reports several terms. These
callables are passed as ``iteration_update`` and keep everything else (handlers, metrics, DDP,
checkpoints, events) MONAI's. Like MONAI's own iterations they set ``engine.state.output`` and
fire ``IterationEvents``; MONAI decollates the batch and runs ``postprocessing`` on
``MODEL_COMPLETED``.
"""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.networks.utils import one_hot

from scripts.deformation import warp_image, warp_labels_nearest

__all__ = ["pair_to_device", "RegistrationTrainStep", "RegistrationEvalStep"]

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
