"""The symmetric registration loss of Estienne et al. (2020), docs/method.md, "Loss"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from scripts.deformation import gradient_to_ddf, warp_image, warp_labels_onehot

__all__ = ["LocalNCCLoss", "PartialLabelDiceLoss", "SymmetricRegistrationLoss"]


class LocalNCCLoss(nn.Module):
    """1 - mean squared local normalised cross-correlation over a cubic box window.

    ``ncc = cross**2 / (var_pred * var_target + eps)`` with local means, variances and covariance
    over ``kernel_size**3`` voxels (the window is cut at the image border); a window where BOTH
    images are flat (variance below ``flat``) counts as a match (ncc = 1): there is nothing to align.
    A window flat in one image only gives ncc ~ 0, so pulling flat padding over anatomy is penalised.

    Why not ``monai.losses.LocalNormalizedCrossCorrelationLoss``: it clamps the variances at
    ``smooth_dr`` instead of adding a constant, so on the flat zero-padded background of the
    hippocampus volumes (about 3/4 of a 64^3 volume) round-off gives squared NCC values up to ~9
    for two identical images, and the background dominates the loss. Here identical images give
    0 (up to eps), and on textured images the voxel-wise values equal MONAI's wherever the window
    lies inside the image.

    ``eps`` is VoxelMorph's 1e-5 on window SUMS, i.e. ``eps / kernel_size**6`` on the local means
    used here (1.9e-11 for a 9^3 window). It bounds the gradient in low-variance windows: with
    1e-12 the real training diverged within 15 iterations (warped labels pushed out of the image).
    ``flat`` (1e-6, a local std of 1e-3) sits well above float32 round-off of a constant window's
    variance.

    ``forward(pred, target)``: (B, C, H, W, D) each -> scalar in [0, 1] (up to round-off).
    """

    def __init__(self, kernel_size: int = 9, eps: float = 1e-5, flat: float = 1e-6) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size, self.flat = int(kernel_size), float(flat)
        self.eps = float(eps) / self.kernel_size**6

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        # A box mean is separable, also where the border cuts the window (the cut box is a product
        # of intervals): three 1-D passes cost 3k instead of k**3 operations per voxel.
        k, r = self.kernel_size, self.kernel_size // 2
        for kernel, pad in (((k, 1, 1), (r, 0, 0)), ((1, k, 1), (0, r, 0)), ((1, 1, k), (0, 0, r))):
            x = F.avg_pool3d(x, kernel, stride=1, padding=pad, count_include_pad=False)
        return x

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 5:
            raise ValueError(
                f"pred and target must both be (B, C, H, W, D), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        p, t = pred.float(), target.float()
        mp, mt = self._mean(p), self._mean(t)
        cross = self._mean(p * t) - mp * mt
        vp = (self._mean(p * p) - mp * mp).clamp_min(0)
        vt = (self._mean(t * t) - mt * mt).clamp_min(0)
        ncc = cross * cross / (vp * vt + self.eps)
        both_flat = (vp < self.flat) & (vt < self.flat)
        return 1 - torch.where(both_flat, torch.ones_like(ncc), ncc).mean()


class SymmetricRegistrationLoss(nn.Module):
    """L = sum over directions of alpha * L_sim + beta * L_dice + gamma * L_smooth.

    - L_sim: MSE, or 1 - mean squared local NCC (``LocalNCCLoss``), between the warped source and
      the target image, averaged over the deep-supervision outputs.
    - L_dice: soft Dice (background excluded, squared denominators, smoothing 1) between the source
      one-hot labels warped trilinearly by the final output and the target labels. Skipped when the
      batch has no labels (unsupervised pretraining).
    - L_smooth: the authors' L1 distance between the head's sigmoid output and 0.5 (zero deformation),
      mean |sigmoid - 0.5| = mean |g - 1| / 2 of the final output, so ``gamma`` is the paper's weight
      (0.1 for hippocampus MRI, 0.01 for abdominal CT).

    Args:
        similarity: "mse" or "lncc". lncc_kernel_size: box window of the local NCC.
        alpha, beta, gamma: weights of similarity, Dice and smoothness.
        num_labels: number of label classes INCLUDING background (3 for hippocampus, 14 for CT).
    """

    def __init__(
        self,
        similarity: str = "lncc",
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.1,
        num_labels: int = 3,
        lncc_kernel_size: int = 9,
    ) -> None:
        super().__init__()
        if similarity == "mse":
            self.similarity = nn.MSELoss()
        elif similarity == "lncc":
            self.similarity = LocalNCCLoss(kernel_size=lncc_kernel_size)
        else:
            raise ValueError(f"similarity must be 'mse' or 'lncc', got {similarity!r}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.num_labels = int(num_labels)
        self.dice = DiceLoss(include_background=False, squared_pred=True, smooth_nr=1.0, smooth_dr=1.0)
        self.last_terms: dict[str, float] = {}

    def _direction(self, grad, src_img, dst_img, src_lab, dst_lab) -> dict[str, torch.Tensor]:
        """grad (B, S, 3, H, W, D); images (B, C, H, W, D); labels (B, 1, H, W, D) integer or None."""
        ddf = gradient_to_ddf(grad)
        sims = [self.similarity(warp_image(src_img, ddf[:, s]), dst_img) for s in range(grad.shape[1])]
        # g = 2 * sigmoid, so |sigmoid - 0.5| = |g - 1| / 2
        terms = {"sim": torch.stack(sims).mean(), "smooth": (grad[:, 0] - 1).abs().mean() / 2}
        if src_lab is not None and dst_lab is not None:
            warped = warp_labels_onehot(one_hot(src_lab.long(), self.num_labels), ddf[:, 0])
            terms["dice"] = self.dice(warped, one_hot(dst_lab.long(), self.num_labels))
        return terms

    def terms(self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss term, summed over directions, and the weighted total under "loss".

        Args:
            pred: the network's training output, ``grad_mf`` and optionally ``grad_fm``, each
                (B, S, 3, H, W, D).
            batch: ``moving_image``, ``fixed_image`` (B, C, H, W, D) and optionally integer label
                maps ``moving_label``, ``fixed_label`` (B, 1, H, W, D).
        """
        m_img, f_img = batch["moving_image"], batch["fixed_image"]
        m_lab, f_lab = batch.get("moving_label"), batch.get("fixed_label")
        directions = [self._direction(pred["grad_mf"], m_img, f_img, m_lab, f_lab)]
        if "grad_fm" in pred:
            directions.append(self._direction(pred["grad_fm"], f_img, m_img, f_lab, m_lab))
        out = {k: sum(d[k] for d in directions) for k in directions[0]}
        out["loss"] = self.alpha * out["sim"] + self.gamma * out["smooth"]
        if "dice" in out:
            out["loss"] = out["loss"] + self.beta * out["dice"]
        return out

    def forward(self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted total (what ``SupervisedTrainer`` back-propagates); every term of this call is
        kept in ``last_terms`` as plain numbers, for the loss curves (train.json's StatsHandler)."""
        terms = self.terms(pred, batch)
        self.last_terms = {k: v.item() for k, v in terms.items()}
        return terms["loss"]


class PartialLabelDiceLoss(nn.Module):
    """Soft Dice loss of a segmentation network trained on partially-labelled cohorts (docs/ct.md):
    each sample's Dice counts only the organs its cohort annotates.

    Per sample and organ, MONAI's ``DiceLoss`` (softmax over the classes, one-hot target); the loss
    is the mean over the (sample, organ) pairs whose ``mask`` is 1. Background is never counted
    (a cohort's background holds the organs it does not annotate). An organ a cohort does not
    annotate contributes nothing: neither its prediction nor its target enter that sample's loss,
    except through the softmax normalisation shared by all classes.

    Args:
        smooth_nr, smooth_dr: Dice smoothing; with an annotated organ absent from a patch the loss
            still pushes its prediction to zero there.
    """

    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, softmax: bool = True) -> None:
        super().__init__()
        self.dice = DiceLoss(
            include_background=True,
            to_onehot_y=True,
            softmax=softmax,
            reduction="none",
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )

    def forward(self, logits: torch.Tensor, target, mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, C, H, W, D) (probabilities with ``softmax=False``), target (B, 1, H, W, D)
        organ ids, mask (B, C): 1 for the organs the sample's cohort annotates. ``target`` may also be
        the dict ``{"label", "mask"}`` (what ``scripts.workflow.PrepareMasked`` gives ``SupervisedTrainer``)."""
        if mask is None:
            target, mask = target["label"], target["mask"]
        per = self.dice(logits, target).reshape(logits.shape[0], logits.shape[1])
        mask = torch.as_tensor(mask, dtype=per.dtype, device=per.device).reshape(per.shape).clone()
        mask[:, 0] = 0
        if not mask.any():
            raise ValueError("no sample of the batch annotates any organ: the partial-label Dice loss is undefined")
        return (per * mask).sum() / mask.sum()
