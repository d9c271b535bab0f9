"""Tests of scripts/losses.py: the local NCC (against an independent reference and MONAI), the
symmetric loss's terms at the identity, its structure, and recovery of a known deformation by
optimising a free gradient field with it."""

import numpy as np
import pytest
import scipy.ndimage
import torch
from conftest import map_coordinates_warp, smooth_volume
from monai.losses import LocalNormalizedCrossCorrelationLoss

from scripts.cohorts import NUM_CLASSES, ORGANS
from scripts.deformation import gradient_to_ddf
from scripts.losses import LocalNCCLoss, PartialLabelDiceLoss, SymmetricRegistrationLoss
from scripts.networks import SpatialGradientRegNet

SIZE = (16, 16, 16)


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)[None, None]


def reference_ncc_map(p, q, k, eps=1e-10):
    """Squared local NCC per voxel in float64 numpy, box window cut at the border (mean over the
    voxels of the window that lie inside the image)."""
    p, q = p.astype(np.float64), q.astype(np.float64)
    box = np.ones((k, k, k))
    count = scipy.ndimage.convolve(np.ones_like(p), box, mode="constant")

    def mean(x):
        return scipy.ndimage.convolve(x, box, mode="constant") / count

    mp, mq = mean(p), mean(q)
    cross = mean(p * q) - mp * mq
    vp, vq = np.maximum(mean(p * p) - mp**2, 0), np.maximum(mean(q * q) - mq**2, 0)
    return (cross**2 + eps) / (vp * vq + eps)


def padded_image(size=(32, 32, 32), margin=12, background=0.45, seed=0):
    """A textured block in a flat background, like the padded hippocampus crops after the bundle's
    preprocessing (z-score of the non-zero voxels, then min-max: the padding becomes ~0.45)."""
    img = np.full(size, background, np.float32)
    inner = tuple(slice(margin, s - margin) for s in size)
    img[inner] = smooth_volume([s - 2 * margin for s in size], sigma=1.0, seed=seed)
    return img


# --------------------------------------------------------------------------- LocalNCCLoss
def test_lncc_identical_images_is_zero():
    loss = LocalNCCLoss(kernel_size=5)
    img = t(smooth_volume(SIZE, seed=1))
    # eps (VoxelMorph's, bounding gradients in low-variance windows) costs a perfect match ~1e-4
    assert loss(img, img).item() == pytest.approx(0.0, abs=1e-3)


def test_lncc_zero_padded_identical_is_zero_where_monai_is_not():
    """Why the class exists: on a flat zero background MONAI's squared NCC of an image with itself
    is far from 1 (its variances are clamped, not smoothed), so the loss of a perfect match is wrong."""
    img = t(padded_image())
    ours = LocalNCCLoss(kernel_size=9)(img, img).item()
    monai_loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular")
    monai = monai_loss(img, img).item()
    # eps in the few low-variance windows at the rim of the padding: ~1e-4
    assert ours == pytest.approx(0.0, abs=1e-3)
    assert abs(monai - (-1.0)) > 0.1, f"MONAI's LNCC of identical zero-padded images is {monai}, expected far from -1"


@pytest.mark.parametrize("contrast", [1.0, 0.5])
def test_lncc_matches_independent_reference_and_monai_interior(contrast):
    """Voxel-wise squared NCC == MONAI's where the window is inside the image (local std 0.08 and
    0.04 in [0, 1] images). Both failed with the former eps=1e-5 (errors up to 0.37 and 0.56): the eps
    was larger than var_pred * var_target and pulled every ncc towards 1."""
    k = 5
    p = 0.5 + contrast * (smooth_volume(SIZE, sigma=1.0, seed=2) - 0.5)
    q = 0.7 * p + 0.3 * (0.5 + contrast * (smooth_volume(SIZE, sigma=1.0, seed=3) - 0.5))
    ref = reference_ncc_map(p, q, k)
    ours = LocalNCCLoss(kernel_size=k)(t(p), t(q)).item()
    assert ours == pytest.approx(1 - ref.mean(), abs=1e-3)  # whole image, incl. the cut windows
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=k, reduction="none")  # rectangular
    monai_map = -monai(t(q).double(), t(p).double())[0, 0].numpy()
    r = k // 2
    inner = (slice(r, -r),) * 3  # windows fully inside: both definitions agree
    np.testing.assert_allclose(ref[inner], monai_map[inner], atol=1e-3)
    assert 0.2 < ref[inner].mean() < 0.99  # a non-trivial comparison
    # ...and they do differ where the window is cut by the border (MONAI pads with zeros)
    assert np.abs(ref - monai_map).max() > 1e-2


def test_lncc_flat_windows_match_only_when_both_images_are_flat():
    # both flat: nothing to align (ncc = 1); one flat: no correlation (ncc = 0), so warping flat
    # padding over anatomy is penalised
    flat = t(np.full(SIZE, 0.3, np.float32))
    tex = t(smooth_volume(SIZE, seed=6))
    loss = LocalNCCLoss(kernel_size=5)
    assert loss(flat, flat + 0.2).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(flat, tex).item() == pytest.approx(1.0, abs=1e-3)
    assert loss(tex, flat).item() == pytest.approx(1.0, abs=1e-3)


def test_lncc_range_and_symmetry():
    loss = LocalNCCLoss(kernel_size=5)
    a, b = t(smooth_volume(SIZE, seed=4)), t(smooth_volume(SIZE, seed=5))
    v = loss(a, b).item()
    assert 0.0 < v <= 1.0
    assert loss(b, a).item() == pytest.approx(v, abs=1e-6)
    # squared NCC: an inverted image is as good a match as the image itself
    assert loss(a, 1 - a).item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="odd"):
        LocalNCCLoss(kernel_size=4)


# --------------------------------------------------------------------------- SymmetricRegistrationLoss
def _batch(seed=0, labels=True, same=True, batch=2):
    rng = np.random.default_rng(seed)
    m = np.stack([smooth_volume(SIZE, seed=seed + i) for i in range(batch)])[:, None]
    f = m.copy() if same else np.stack([smooth_volume(SIZE, seed=seed + 10 + i) for i in range(batch)])[:, None]
    out = {"moving_image": torch.from_numpy(m), "fixed_image": torch.from_numpy(f)}
    if labels:
        lab = rng.integers(0, 3, size=(batch, 1, *SIZE))
        out["moving_label"] = torch.from_numpy(lab)
        out["fixed_label"] = torch.from_numpy(lab.copy() if same else rng.integers(0, 3, size=lab.shape))
    return out


def _identity(batch=2, heads=5, symmetric=True):
    g = torch.ones(batch, heads, 3, *SIZE)
    return {"grad_mf": g, "grad_fm": g.clone()} if symmetric else {"grad_mf": g}


@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_identity_with_identical_pair_is_zero(similarity):
    loss = SymmetricRegistrationLoss(similarity=similarity, lncc_kernel_size=5)
    terms = loss.terms(_identity(), _batch())
    assert set(terms) == {"loss", "sim", "smooth", "dice"}
    for k, v in terms.items():
        assert v.item() == pytest.approx(0.0, abs=1e-3 if k in ("sim", "loss") else 1e-5), k


@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_terms_are_positive_for_a_different_pair(similarity):
    loss = SymmetricRegistrationLoss(similarity=similarity, lncc_kernel_size=5, alpha=2.0, beta=3.0, gamma=0.5)
    pred = {k: 2 * torch.sigmoid(torch.randn_like(v)) for k, v in _identity().items()}
    terms = loss.terms(pred, _batch(same=False))
    assert all(terms[k] > 0.01 for k in ("sim", "smooth", "dice"))
    assert terms["loss"].item() == pytest.approx(
        2.0 * terms["sim"].item() + 3.0 * terms["dice"].item() + 0.5 * terms["smooth"].item(), rel=1e-5
    )
    # smooth is the authors' |sigmoid - 0.5| of the final output only, summed over the two directions
    expected = sum((pred[k][:, 0] / 2 - 0.5).abs().mean() for k in pred)
    assert terms["smooth"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_labels_no_dice():
    loss = SymmetricRegistrationLoss(similarity="lncc", lncc_kernel_size=5)
    pred = {k: 2 * torch.sigmoid(0.3 * torch.randn_like(v)) for k, v in _identity().items()}
    terms = loss.terms(pred, _batch(same=False, labels=False))
    assert "dice" not in terms
    assert torch.isfinite(terms["loss"])
    assert terms["loss"].item() == pytest.approx(terms["sim"].item() + 0.1 * terms["smooth"].item(), rel=1e-5)


def test_one_direction_only_and_sum_of_directions():
    loss = SymmetricRegistrationLoss(similarity="mse")
    batch = _batch(same=False)
    g_mf = 2 * torch.sigmoid(0.3 * torch.randn(2, 5, 3, *SIZE))
    g_fm = 2 * torch.sigmoid(0.3 * torch.randn(2, 5, 3, *SIZE))
    both = loss.terms({"grad_mf": g_mf, "grad_fm": g_fm}, batch)
    forward = loss.terms({"grad_mf": g_mf}, batch)
    swapped = {
        "moving_image": batch["fixed_image"],
        "fixed_image": batch["moving_image"],
        "moving_label": batch["fixed_label"],
        "fixed_label": batch["moving_label"],
    }
    backward = loss.terms({"grad_mf": g_fm}, swapped)
    for k in both:
        assert both[k].item() == pytest.approx(forward[k].item() + backward[k].item(), rel=1e-5), k
        assert forward[k].item() != pytest.approx(both[k].item(), rel=1e-3), k


def test_similarity_is_averaged_over_deep_supervision_outputs():
    loss = SymmetricRegistrationLoss(similarity="mse")
    batch = _batch(same=False, labels=False)
    g = 2 * torch.sigmoid(0.3 * torch.randn(2, 3, 3, *SIZE))
    together = loss.terms({"grad_mf": g}, batch)["sim"]
    each = [loss.terms({"grad_mf": g[:, s : s + 1]}, batch)["sim"] for s in range(3)]
    assert together.item() == pytest.approx(torch.stack(each).mean().item(), rel=1e-5)
    # smoothness uses the final output only
    assert loss.terms({"grad_mf": g}, batch)["smooth"].item() == pytest.approx(
        (g[:, 0] / 2 - 0.5).abs().mean().item(), rel=1e-5
    )


def test_bad_similarity_name():
    with pytest.raises(ValueError, match="similarity"):
        SymmetricRegistrationLoss(similarity="ncc2")


def test_gradient_flows_to_the_network():
    # (16, 16, 32): divisible by 16, and 2 voxels at the bottleneck (training-mode instance norm needs > 1)
    net = SpatialGradientRegNet(channels=(4, 8, 16, 32, 64)).train()
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(1, 1, 16, 16, 32, generator=gen) for k in ("moving_image", "fixed_image")}
    batch["moving_label"] = (batch["moving_image"] > 0.5).long()
    batch["fixed_label"] = (batch["fixed_image"] > 0.5).long()
    loss = SymmetricRegistrationLoss(similarity="lncc", lncc_kernel_size=5, num_labels=2)
    loss(net(torch.cat([batch["moving_image"], batch["fixed_image"]], 1)), batch).backward()
    # the heads start at zero, so at initialisation only they receive a gradient; they must
    for head in [net.head, *net.ds_heads]:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # one step later the whole network learns
    with torch.no_grad():
        for head in [net.head, *net.ds_heads]:
            head.weight.add_(-0.1 * head.weight.grad.sign())
    net.zero_grad()
    loss(net(torch.cat([batch["moving_image"], batch["fixed_image"]], 1)), batch).backward()
    frozen = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not frozen


# --------------------------------------------------------------------------- recovering a known deformation
@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_known_smooth_deformation_is_recovered(similarity):
    """Optimise a free field of logits, g = 2 sigmoid(logits), with the loss; the integrated DDF must
    match the known displacement that made the fixed image (warped with scipy, independently)."""
    n = 24
    moving = smooth_volume((n, n, n), sigma=2.0, seed=11)
    x = np.sin(np.pi * np.arange(n) / (n - 1))
    bump = x[:, None, None] * x[None, :, None] * x[None, None, :]  # zero at the border
    u_true = np.stack([1.5 * bump, -1.5 * bump, 1.0 * bump]).astype(np.float32)  # up to 1.5 voxels
    fixed = map_coordinates_warp(moving, u_true, order=1)
    batch = {"moving_image": t(moving), "fixed_image": t(fixed)}

    loss = SymmetricRegistrationLoss(similarity=similarity, gamma=0.0, lncc_kernel_size=5)
    logits = torch.zeros(1, 1, 3, n, n, n, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss({"grad_mf": 2 * torch.sigmoid(logits)}, batch).backward()
        opt.step()
    ddf = gradient_to_ddf(2 * torch.sigmoid(logits.detach()))[0, 0].numpy()
    inner = (slice(None),) + (slice(4, -4),) * 3
    before = np.abs(u_true[inner]).mean()
    err = np.abs(ddf[inner] - u_true[inner]).mean()
    assert before > 0.6
    assert err < 0.3, f"mean abs error {err:.3f} voxel (identity: {before:.3f})"


def test_smoothness_is_the_authors_l1_between_sigmoid_and_half():
    """gamma weighs mean |sigmoid - 0.5| (the authors' term), not mean |g - 1| (twice as large)."""
    g = torch.ones(1, 5, 3, *SIZE)
    g[:, 0, 0] = 1.5  # sigmoid 0.75 on a third of the final output's values
    g[:, 1:] = 0.2  # deep-supervision heads: not regularised
    loss = SymmetricRegistrationLoss(similarity="mse", gamma=0.1)
    terms = loss.terms({"grad_mf": g}, _batch(batch=1, labels=False))
    assert terms["smooth"].item() == pytest.approx(0.25 / 3, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["sim"].item() + 0.1 * 0.25 / 3, rel=1e-6)


# --------------------------------------------------------------------------- partial-label loss
def test_organ_a_cohort_does_not_annotate_contributes_nothing():
    torch.manual_seed(0)
    n = NUM_CLASSES
    target = torch.randint(0, 5, (2, 1, 8, 8, 8))  # organ ids 0..4 (4: liver)
    mask = torch.zeros(2, n)
    mask[0, [1, 2]] = 1  # sample 0's cohort annotates spleen and right kidney
    mask[1, [1, 2, 4]] = 1  # sample 1's also the liver
    loss = PartialLabelDiceLoss(softmax=False)
    probs = torch.softmax(torch.randn(2, n, 8, 8, 8), 1).requires_grad_()
    value = loss(probs, target, mask)
    value.backward()
    liver = ORGANS.index("liver") + 1
    assert torch.count_nonzero(probs.grad[0, liver]) == 0  # not annotated by sample 0's cohort
    assert torch.count_nonzero(probs.grad[0, 0]) == 0  # background is never counted
    assert torch.count_nonzero(probs.grad[1, liver]) > 0  # annotated by sample 1's cohort
    assert torch.count_nonzero(probs.grad[0, 1]) > 0
    # Changing sample 0's liver prediction leaves the loss unchanged; sample 1's does not.
    for sample, same in ((0, True), (1, False)):
        changed = probs.detach().clone()
        changed[sample, liver] = torch.rand(8, 8, 8)
        assert torch.equal(loss(changed, target, mask), value.detach()) == same
    # Equal to the mean of per-(sample, organ) soft Dice over annotated pairs (hand-written).
    one_hot = torch.nn.functional.one_hot(target[:, 0], n).permute(0, 4, 1, 2, 3).float()
    p = probs.detach()
    dice = 1 - (2 * (p * one_hot).sum((2, 3, 4)) + 1e-5) / (p.sum((2, 3, 4)) + one_hot.sum((2, 3, 4)) + 1e-5)
    assert torch.allclose(value.detach(), dice[mask.bool()].mean(), atol=1e-6)
    with pytest.raises(ValueError, match="no sample of the batch annotates any organ"):
        loss(probs, target, torch.zeros(2, n))
