"""Tests of scripts/deformation.py: cumsum integration of spatial gradients and the warps, checked
against hand computations and ``scipy.ndimage.map_coordinates`` (what the Learn2Reg evaluation uses)."""

import numpy as np
import pytest
import scipy.ndimage
import torch
from conftest import map_coordinates_warp, smooth_ddf, smooth_volume

from scripts.deformation import compose_ddf, ddf_to_gradient, flip_ddf, gradient_to_ddf, invert_ddf
from scripts.deformation import smooth_ddf as smooth_field
from scripts.deformation import warp_image, warp_labels_nearest, warp_labels_onehot

SHAPE = (12, 14, 16)  # anisotropic on purpose: a swapped axis would break shapes or values


# --------------------------------------------------------------------------- gradient_to_ddf
def test_gradient_of_ones_is_identity():
    ddf = gradient_to_ddf(torch.ones(2, 3, *SHAPE))
    assert ddf.shape == (2, 3, *SHAPE)
    assert torch.count_nonzero(ddf) == 0  # exactly zero, not just close


def test_gradient_with_extra_leading_dims():
    # (B, S, 3, H, W, D), the training output with deep supervision, integrates per head
    g = 2 * torch.rand(2, 4, 3, *SHAPE)
    ddf = gradient_to_ddf(g)
    assert ddf.shape == g.shape
    for s in range(4):
        assert torch.allclose(ddf[:, s], gradient_to_ddf(g[:, s]))


def test_hand_checked_1d_cumsum():
    # g varies only along axis c, for channel c; p_c(i) = sum_{k<=i} g_c(k) - 1, ddf = p - i
    g1d = torch.tensor([1.0, 0.5, 1.5, 2.0, 0.25, 1.0, 1.0, 0.75])
    expected = torch.tensor([0.0, -0.5, 0.0, 1.0, 0.25, 0.25, 0.25, 0.0])  # cumsum(g - 1)
    n = len(g1d)
    g = torch.ones(1, 3, n, n, n)
    g[0, 0] = g1d[:, None, None]
    g[0, 1] = g1d[None, :, None]
    g[0, 2] = g1d[None, None, :]
    ddf = gradient_to_ddf(g)[0]
    for c in range(3):
        line = ddf[c].movedim(c, 0)  # axis c first; every line along axis c is the same
        assert torch.allclose(line, expected.view(n, 1, 1).expand_as(line))
    # the sampling coordinate p = i + ddf is the cumulative sum of g minus 1
    assert torch.allclose(torch.arange(n) + ddf[0, :, 0, 0], torch.cumsum(g1d, 0) - 1)


def test_channel_c_integrates_along_axis_c_only():
    # a step of g_c in the slice i0 along axis c shifts every voxel at or after i0 along axis c only
    i0 = 5
    for c in range(3):
        g = torch.ones(1, 3, *SHAPE)
        g[0, c].select(c, i0).fill_(1.5)
        ddf = gradient_to_ddf(g)[0]
        idx = torch.arange(SHAPE[c]).view([-1 if a == c else 1 for a in range(3)]).expand(SHAPE)
        assert torch.equal(ddf[c], torch.where(idx >= i0, 0.5, 0.0))
        assert torch.count_nonzero(ddf[[a for a in range(3) if a != c]]) == 0


def test_positive_gradient_never_self_crosses():
    g = torch.rand(2, 3, *SHAPE) * 2 + 1e-3  # any positive values, far from 1
    ddf = gradient_to_ddf(g)
    for c in range(3):
        axis = 2 + c
        coord = torch.arange(SHAPE[c], dtype=ddf.dtype).view([-1 if a == axis else 1 for a in range(5)])
        p = coord + ddf[:, c : c + 1]
        assert (torch.diff(p, dim=axis) > 0).all(), f"x_{c} + ddf_{c} not strictly increasing along axis {c}"
        # the step along axis c is exactly g_c
        assert torch.allclose(torch.diff(p, dim=axis), g[:, c : c + 1].narrow(axis, 1, SHAPE[c] - 1), atol=1e-5)


def test_gradient_shape_error():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W, D\)"):
        gradient_to_ddf(torch.ones(1, 2, 4, 4, 4))


# --------------------------------------------------------------------------- warps vs scipy
def test_warp_image_matches_map_coordinates():
    image = smooth_volume(SHAPE, seed=1)
    ddf = smooth_ddf(SHAPE, amplitude=2.5, seed=2)
    ours = warp_image(torch.from_numpy(image)[None, None], torch.from_numpy(ddf)[None])[0, 0].numpy()
    ref = map_coordinates_warp(image, ddf, order=1)
    # interior: away from the border, where both pad the same way anyway
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-5)
    # border padding == scipy's "nearest": equal everywhere in fact
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_warp_image_integer_shift_is_exact_roll():
    # u = +1 along axis 1 pulls moving(x, y + 1): a shift by one voxel, last row repeated (border)
    image = torch.from_numpy(smooth_volume(SHAPE, seed=3))[None, None]
    ddf = torch.zeros(1, 3, *SHAPE)
    ddf[:, 1] = 1.0
    out = warp_image(image, ddf)
    assert torch.allclose(out[..., :-1, :], image[..., 1:, :], atol=1e-5)
    assert torch.allclose(out[..., -1, :], image[..., -1, :], atol=1e-5)


def test_warp_image_multichannel_and_zero_padding():
    image = torch.rand(2, 3, *SHAPE)
    ddf = torch.zeros(2, 3, *SHAPE)
    assert torch.allclose(warp_image(image, ddf), image, atol=1e-5)  # identity
    ddf[:, 0] = 100.0  # every sample far outside
    assert torch.count_nonzero(warp_image(image, ddf, padding="zeros")) == 0
    with pytest.raises(ValueError, match="padding"):
        warp_image(image, ddf, padding="reflection")


def _labels(shape, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=shape).astype(np.int64)


def test_warp_labels_nearest_matches_map_coordinates_order0():
    labels = _labels(SHAPE, 4, seed=4)
    ddf = smooth_ddf(SHAPE, amplitude=2.5, seed=5)
    identity = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    frac = np.abs(((identity + ddf) % 1.0) - 0.5)
    ddf[frac < 0.02] += 0.05  # move sample points off the .5 ties, where rounding rules differ
    frac = np.abs(((identity + ddf) % 1.0) - 0.5)
    assert frac.min() > 1e-3
    ours = warp_labels_nearest(torch.from_numpy(labels)[None, None], torch.from_numpy(ddf)[None])
    assert ours.dtype == torch.int64
    ours = ours[0, 0].numpy()
    ref = map_coordinates_warp(labels, ddf, order=0)
    inside = np.all((identity + ddf >= 0) & (identity + ddf <= np.array(SHAPE).reshape(3, 1, 1, 1) - 1), axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_array_equal(ours[inside], ref[inside])
    # only values of the input; never an interpolated one (0 is the outside value)
    assert set(np.unique(ours)) <= set(np.unique(labels)) | {0}


def test_warp_labels_nearest_values_are_copied():
    labels = torch.from_numpy(_labels(SHAPE, 1, 0) + np.array([3, 7])[np.random.default_rng(0).integers(0, 2, SHAPE)])
    ddf = torch.from_numpy(smooth_ddf(SHAPE, amplitude=3.3, seed=6))[None]
    out = warp_labels_nearest(labels[None, None], ddf)
    assert set(out.unique().tolist()) <= {0, 3, 7}


def test_warp_labels_onehot_is_a_partition_of_unity():
    n = 4
    labels = torch.from_numpy(_labels(SHAPE, n, seed=7))[None, None]
    onehot = torch.nn.functional.one_hot(labels[:, 0], n).permute(0, 4, 1, 2, 3).float()
    ddf = torch.from_numpy(smooth_ddf(SHAPE, amplitude=4.0, seed=8))[None]
    ddf[:, 0] += 3.0  # push part of the samples outside the image on purpose
    out = warp_labels_onehot(onehot, ddf)
    assert out.shape == onehot.shape
    assert torch.allclose(out.sum(1), torch.ones(1, *SHAPE), atol=1e-5)
    assert (out >= -1e-6).all() and (out <= 1 + 1e-6).all()
    # outside the moving image: pure background
    outside = (torch.arange(SHAPE[0]).view(-1, 1, 1) + ddf[0, 0]) > SHAPE[0]
    assert outside.any()
    assert torch.allclose(out[0, 0][outside], torch.ones(()), atol=1e-6)
    # zero DDF: the one-hot map itself
    assert torch.allclose(warp_labels_onehot(onehot, torch.zeros_like(ddf)), onehot, atol=1e-5)


def test_warp_labels_onehot_is_differentiable():
    onehot = torch.rand(1, 3, *SHAPE)
    onehot = onehot / onehot.sum(1, keepdim=True)
    ddf = torch.from_numpy(smooth_ddf(SHAPE, 1.5, seed=9))[None].requires_grad_()
    warp_labels_onehot(onehot, ddf)[:, 1:].sum().backward()
    assert ddf.grad is not None and ddf.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 17, 20, 9), (1, 1, 5, 1, 7)])
def test_warps_equal_monai_warp_to_the_bit(shape):
    # The helpers use their own device-resident reference grid instead of monai's Warp (speed), with
    # the same arithmetic: values and gradients must not differ at all, also along a singleton axis.
    import warnings

    from monai.networks.blocks import Warp

    torch.manual_seed(0)
    image = torch.randn(*shape)
    labels = torch.randint(0, 4, (shape[0], 1, *shape[2:]))
    ddf = (torch.randn(shape[0], 3, *shape[2:]) * 4).requires_grad_()
    ddf_ref = ddf.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        border, zeros, nearest = (
            Warp(mode=m, padding_mode=p)
            for m, p in (("bilinear", "border"), ("bilinear", "zeros"), ("nearest", "zeros"))
        )
    assert torch.equal(warp_image(image, ddf), border(image, ddf_ref))
    assert torch.equal(warp_image(image, ddf, padding="zeros"), zeros(image, ddf_ref))
    assert torch.equal(warp_labels_nearest(labels, ddf.detach()), nearest(labels.float(), ddf_ref.detach()).long())
    (warp_image(image, ddf) ** 2).sum().backward()
    (border(image, ddf_ref) ** 2).sum().backward()
    assert torch.equal(ddf.grad, ddf_ref.grad)


def test_warp_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="must match"):
        warp_image(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 7))


# --------------------------------------------------------------------------- inverse and flips
def test_ddf_to_gradient_inverts_the_integration():
    gen = torch.Generator().manual_seed(3)
    g = 0.2 + 1.6 * torch.rand(2, 3, 5, 6, 7, generator=gen, dtype=torch.float64)
    ddf = gradient_to_ddf(g)
    assert torch.allclose(ddf_to_gradient(ddf), g, rtol=0, atol=1e-12)
    assert torch.allclose(gradient_to_ddf(ddf_to_gradient(ddf)), ddf, rtol=0, atol=1e-12)
    assert torch.equal(ddf_to_gradient(torch.zeros(1, 3, 4, 4, 4)), torch.ones(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="must be"):
        ddf_to_gradient(torch.zeros(1, 2, 4, 4, 4))


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 2), (0, 1, 2)])
def test_flip_ddf_registers_the_unflipped_images(axes):
    # A field found on flipped images, brought back, must warp the images as they are exactly as the
    # original field warped the flipped ones (then flipped back). Trilinear sampling with voxel centres
    # at integer coordinates is symmetric under x -> n - 1 - x, so the identity is exact to rounding.
    gen = torch.Generator().manual_seed(4)
    size = (9, 10, 11)
    moving = torch.rand(1, 2, *size, generator=gen, dtype=torch.float64)
    ddf = gradient_to_ddf(0.5 + torch.rand(1, 3, *size, generator=gen, dtype=torch.float64))
    dims = [a + 2 for a in axes]
    expected = warp_image(moving.flip(dims), ddf).flip(dims)
    got = warp_image(moving, flip_ddf(ddf, axes))
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    assert not torch.allclose(warp_image(moving, ddf.flip(dims)), expected, atol=1e-3)  # sign change needed
    assert torch.equal(flip_ddf(flip_ddf(ddf, axes), axes), ddf)
    # no self-crossing is kept: the flipped-back field's gradient is positive where the field's was
    assert (ddf_to_gradient(flip_ddf(ddf, axes))[..., 1:, 1:, 1:] > 0).all()


def test_invert_ddf_composes_to_the_identity():
    u = torch.from_numpy(smooth_ddf(SHAPE, amplitude=2.0, seed=5, sigma=3.0))[None].double()
    v = invert_ddf(u, iterations=30)
    # v(x) + u(x + v(x)) == 0: going along v then along u comes back, away from the border
    back = v + warp_image(u, v, padding="border")
    inner = (slice(None), slice(None), *[slice(3, -3)] * 3)
    assert back[inner].abs().max() < 1e-4 and v.abs().max() > 1.5
    # also a left inverse, to the trilinear interpolation error of v between voxels
    assert (u + warp_image(v, u, padding="border"))[inner].abs().max() < 0.1
    assert (-u - v)[inner].abs().max() > 0.05  # not merely the negated field


def test_compose_ddf_is_warping_twice():
    first = torch.from_numpy(smooth_ddf(SHAPE, amplitude=2.0, seed=3, sigma=3.0))[None].double()
    then = torch.from_numpy(smooth_ddf(SHAPE, amplitude=1.5, seed=4, sigma=3.0))[None].double()
    # a linear image: trilinear interpolation is exact on it, so warping twice equals one warp by the
    # composition wherever both warps sample inside the grid
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in SHAPE], indexing="ij"))
    moving = (0.3 * grid[0] - 0.7 * grid[1] + 1.1 * grid[2])[None, None]
    both = compose_ddf(first, then)
    inner = (slice(None), slice(None), *[slice(4, -4)] * 3)
    twice = warp_image(warp_image(moving, first), then)
    assert torch.allclose(warp_image(moving, both)[inner], twice[inner], rtol=0, atol=1e-9)
    # the order matters, and composing with zero changes nothing
    assert (compose_ddf(then, first) - both)[inner].abs().max() > 0.05
    assert torch.allclose(compose_ddf(first, torch.zeros_like(first)), first, rtol=0, atol=1e-12)
    assert torch.equal(compose_ddf(torch.zeros_like(then), then), then)
    # a field and its inverse compose to the identity
    assert compose_ddf(first, invert_ddf(first, iterations=30))[inner].abs().max() < 1e-4
    with pytest.raises(ValueError, match="one shape"):
        compose_ddf(first, then[..., :-1])


# --------------------------------------------------------------------------- smooth_ddf
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_smooth_field_is_scipy_gaussian_filter_with_nearest_borders(sigma):
    u = torch.from_numpy(smooth_ddf(SHAPE, amplitude=3.0, seed=2, sigma=1.0))[None].double()
    got = smooth_field(u, sigma)
    want = np.stack(
        [scipy.ndimage.gaussian_filter(u[0, c].numpy(), sigma, mode="nearest", truncate=4.0) for c in range(3)]
    )
    np.testing.assert_allclose(got[0].numpy(), want, rtol=0, atol=1e-5)  # MONAI builds the kernel in float32
    assert (got - u).abs().max() > 0.05  # it does smooth


def test_smooth_field_keeps_translations_and_positive_gradients():
    shift = torch.full((1, 3, *SHAPE), 2.5)
    assert (smooth_field(shift, 1.0) - shift).abs().max() < 1e-6  # to rounding
    u = torch.zeros(1, 3, *SHAPE)
    assert smooth_field(u, 0.0) is u
    # g near its bounds (0, 2): rough, folding-prone fields; smoothing keeps g > 0 (index 0 is a border sample)
    gen = torch.Generator().manual_seed(3)
    g = torch.where(torch.rand(2, 3, *SHAPE, generator=gen, dtype=torch.float64) < 0.5, 1e-3, 1.999)
    rough = gradient_to_ddf(g)
    smooth = smooth_field(rough, 1.0)
    gs = ddf_to_gradient(smooth)[..., 1:, 1:, 1:]
    assert (gs > 0).all() and gs.std() < 0.5 * ddf_to_gradient(rough)[..., 1:, 1:, 1:].std()


def test_smooth_field_errors():
    with pytest.raises(ValueError, match="must not be negative"):
        smooth_field(torch.zeros(1, 3, *SHAPE), -1.0)
    with pytest.raises(ValueError, match="must not be negative"):
        smooth_field(torch.zeros(1, 3, *SHAPE), float("nan"))
    with pytest.raises(ValueError, match="ddf must be"):
        smooth_field(torch.zeros(1, 2, *SHAPE), 1.0)
