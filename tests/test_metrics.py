"""Tests of scripts/metrics.py: hand-computed cases and equality with the official L2R formulas."""

import numpy as np
import pytest
import scipy.ndimage
import surface_distance

from scripts import metrics as M

# the official reference below calls surface_distance 0.1, which uses deprecated scipy namespaces
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:surface_distance.metrics")


def cube(shape, start, size, label=1):
    seg = np.zeros(shape)
    seg[tuple(slice(s, s + size) for s in start)] = label
    return seg


def smooth_field(shape, amplitude, seed):
    """Random smooth (H, W, D, 3) displacement in voxels."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(tuple(shape) + (3,))
    field = np.stack([scipy.ndimage.gaussian_filter(noise[..., c], 2.0) for c in range(3)], -1)
    return amplitude * field / np.abs(field).max()


def random_labels(shape, n_labels, seed):
    rng = np.random.default_rng(seed)
    blobs = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    edges = np.quantile(blobs, np.linspace(0, 1, n_labels + 2)[1:-1])
    return np.digitize(blobs, edges).astype(float)  # 0 .. n_labels


# --------------------------------------------------------------------------- Dice and Dice30
def test_dice_cubes_by_hand():
    fixed = cube((10, 10, 10), (2, 2, 2), 4)  # 64 voxels
    warped = cube((10, 10, 10), (3, 2, 2), 4)  # shifted by 1: overlap 3*4*4 = 48
    d = M.dice_per_label(fixed, warped, fixed, [1])
    assert d[0] == pytest.approx(2 * 48 / (64 + 64))


def test_dice_absent_label_is_nan_and_excluded():
    fixed = cube((10, 10, 10), (2, 2, 2), 4, label=1) + cube((10, 10, 10), (7, 7, 7), 2, label=2)
    moving = cube((10, 10, 10), (2, 2, 2), 4, label=1)  # no label 2 in moving
    moving[0, 0, 0] = 3  # label 3 in moving but not in fixed
    warped = moving.copy()
    d = M.dice_per_label(fixed, warped, moving, [1, 2, 3])
    assert d[0] == 1.0 and np.isnan(d[1]) and np.isnan(d[2])
    # ... even though the warped map has label 2 where the fixed has it: rule is on the moving map
    warped2 = fixed.copy()
    assert np.isnan(M.dice_per_label(fixed, warped2, moving, [2])[0])
    res = M.evaluate_pair(fixed, moving, np.zeros((10, 10, 10, 3)), [1, 2, 3])
    assert res["dice"] == 1.0  # mean over the scored label only


def test_dice_label_warped_away_is_zero_and_hd95_inf():
    fixed = cube((10, 10, 10), (2, 2, 2), 3)
    d = M.dice_per_label(fixed, np.zeros_like(fixed), fixed, [1])
    h = M.hd95_per_label(fixed, np.zeros_like(fixed), fixed, [1])
    assert d[0] == 0.0 and np.isinf(h[0])


def test_dice30_is_the_30th_percentile():
    x = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.3, 1.0, 0.4, 0.6, np.nan])
    s = M.summarize(x)
    finite = np.sort(x[~np.isnan(x)])
    assert s["p30"] == pytest.approx(np.quantile(finite, 0.3)) == pytest.approx(0.37)
    lowest_30_mean = finite[:3].mean()  # 0.2: the wrong definition
    assert abs(s["p30"] - lowest_30_mean) > 0.1
    assert s["mean"] == pytest.approx(0.55) and s["n"] == 10
    assert s["std"] == pytest.approx(finite.std())  # population std, as np.std in the official code
    assert np.isnan(M.summarize([np.nan])["mean"])


# --------------------------------------------------------------------------- HD95
@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_shifted_cubes(k):
    shape = (16, 12, 12)
    fixed = cube(shape, (3, 3, 3), 6)
    warped = cube(shape, (3 + k, 3, 3), 6)
    assert M.hd95_per_label(fixed, warped, fixed, [1])[0] == pytest.approx(k)
    # spacing along the shift axis scales the distance: 2 mm voxels -> 2k mm
    assert M.hd95_per_label(fixed, warped, fixed, [1], spacing=(2, 1, 1))[0] == pytest.approx(2 * k)


# --------------------------------------------------------------------------- Jacobian
def test_jacobian_zero_field():
    jac = M.jacobian_determinant(np.zeros((9, 10, 11, 3)))
    assert jac.shape == (5, 6, 7)
    np.testing.assert_array_equal(jac, 1.0)
    assert M.sdlogj_official(jac) == 0.0 and M.sdlogj_plain(jac) == 0.0
    assert M.folding_percent(jac) == 0.0


def test_jacobian_linear_field():
    a = np.array([[0.1, -0.2, 0.05], [0.3, -0.1, 0.0], [-0.05, 0.2, 0.25]])
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in (8, 9, 10)), indexing="ij"), -1)
    disp = grid @ a.T  # u_c(x) = sum_a a[c, a] x_a
    jac = M.jacobian_determinant(disp)
    np.testing.assert_allclose(jac, np.linalg.det(np.eye(3) + a), rtol=0, atol=1e-12)


def test_jacobian_fold():
    disp = np.zeros((12, 12, 12, 3))
    x = np.arange(12, dtype=float)[:, None, None]
    disp[:, 4:8, :, 0] = -2.0 * x  # x + u_x = -x on a band: orientation reversed, J = -1
    jac = M.jacobian_determinant(disp)
    assert jac.min() == pytest.approx(-1.0)
    assert 0 < M.folding_percent(jac) < 100
    assert M.folding_percent(jac) == pytest.approx(100 * np.mean(jac <= 0))
    assert np.isfinite(M.sdlogj_official(jac))  # the +3 keeps J = -1 finite


def test_folding_and_plain_sdlogj_on_given_values():
    jac = np.array([1.0, np.e, 0.0, -1.0])
    assert M.folding_percent(jac) == 50.0  # J == 0 counts as folded
    assert M.sdlogj_plain(jac) == pytest.approx(0.5)  # std of log over J > 0 only: std([0, 1])
    assert M.sdlogj_official(jac) == pytest.approx(np.std(np.log(np.clip(jac + 3, 1e-9, 1e9))))
    assert np.isnan(M.sdlogj_plain(np.array([0.0, -2.0])))


def test_sdlogj_by_hand_on_smooth_field():
    jac = M.jacobian_determinant(smooth_field((12, 12, 12), 1.5, seed=0))
    assert (jac + 3 > 1e-9).all()
    assert M.sdlogj_official(jac) == pytest.approx(np.std(np.log(jac + 3)), rel=1e-12)
    assert M.sdlogj_plain(jac) == pytest.approx(np.std(np.log(jac[jac > 0])), rel=1e-12)


def test_jacobian_float32_input_matches_float64():
    disp = smooth_field((10, 10, 10), 2.0, seed=1)
    np.testing.assert_array_equal(
        M.jacobian_determinant(disp.astype(np.float32)),
        M.jacobian_determinant(disp.astype(np.float32).astype(np.float64)),
    )


# --------------------------------------------------------------------------- warping
def test_warp_integer_shift_is_roll():
    moving = random_labels((10, 11, 12), 3, seed=2)
    s = 2
    disp = np.zeros((10, 11, 12, 3))
    disp[..., 1] = s  # warped(x) = moving(x + s e_1)
    warped = M.warp_labels_official(moving, disp)
    np.testing.assert_array_equal(warped[:, :-s], np.roll(moving, -s, axis=1)[:, :-s])
    np.testing.assert_array_equal(warped[:, -s:], 0)  # outside the moving image: background


# --------------------------------------------------------------------------- validation
def test_input_validation():
    fixed = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(8, 8, 8, 3\)"):
        M.evaluate_pair(fixed, fixed, np.zeros((8, 8, 7, 3)), [1])
    with pytest.raises(ValueError, match="channel last"):
        M.evaluate_pair(fixed, fixed, np.zeros((8, 8, 8, 2)), [1])
    with pytest.raises(ValueError, match="3-D label map"):
        M.evaluate_pair(np.zeros((8, 8)), fixed, np.zeros((8, 8, 8, 3)), [1])
    with pytest.raises(ValueError, match="expected"):
        M.dice_per_label(fixed, np.zeros((8, 8, 9)), fixed, [1])
    with pytest.raises(ValueError, match="too small"):
        M.jacobian_determinant(np.zeros((4, 8, 8, 3)))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95_per_label(fixed, fixed, fixed, [1], spacing=(1, 1))


# --------------------------------------------------------------------------- official reference
# Independent transcription of the official formulas, github.com/MDL-UzL/L2R:
#   evaluation/utils.py       jacobian_determinant, compute_dice, compute_hd95
#   evaluation/evaluation.py  warp by map_coordinates(moving, identity + disp.transpose(3,0,1,2),
#                             order=0); sdlogj = log((jacdet + 3).clip(1e-9, 1e9)).std() with
#                             disp[np.newaxis].transpose(0, 4, 1, 2, 3) as the (1, 3, H, W, D) input
def official_jacobian_determinant(disp_b3hwd):
    gradx = np.array([-0.5, 0, 0.5]).reshape(1, 3, 1, 1)
    grady = np.array([-0.5, 0, 0.5]).reshape(1, 1, 3, 1)
    gradz = np.array([-0.5, 0, 0.5]).reshape(1, 1, 1, 3)
    grads = []
    for kernel in (gradx, grady, gradz):
        grads.append(
            np.stack(
                [scipy.ndimage.correlate(disp_b3hwd[:, c], kernel, mode="constant", cval=0.0) for c in range(3)], axis=1
            )
        )
    grad_disp = np.concatenate(grads, 0)  # (3 derivative axes, 3 components, H, W, D)
    jac = (grad_disp + np.eye(3, 3).reshape(3, 3, 1, 1, 1))[:, :, 2:-2, 2:-2, 2:-2]
    return (
        jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
        - jac[1, 0] * (jac[0, 1] * jac[2, 2] - jac[0, 2] * jac[2, 1])
        + jac[2, 0] * (jac[0, 1] * jac[1, 2] - jac[0, 2] * jac[1, 1])
    )


def official_pair(fixed_seg, moving_seg, disp_field, labels):
    identity = np.meshgrid(*(np.arange(n) for n in fixed_seg.shape), indexing="ij")
    warped = scipy.ndimage.map_coordinates(moving_seg, identity + disp_field.transpose(3, 0, 1, 2), order=0)
    jac_det = (official_jacobian_determinant(disp_field[np.newaxis].transpose((0, 4, 1, 2, 3))) + 3).clip(1e-9, 1e9)
    dice, hd95 = [], []
    for i in labels:
        if ((fixed_seg == i).sum() == 0) or ((moving_seg == i).sum() == 0):
            dice.append(np.nan)
            hd95.append(np.nan)
        else:
            dice.append(surface_distance.compute_dice_coefficient(fixed_seg == i, warped == i))
            sd = surface_distance.compute_surface_distances(fixed_seg == i, warped == i, np.ones(3))
            hd95.append(surface_distance.compute_robust_hausdorff(sd, 95.0))
    return {
        "warped": warped,
        "sdlogj": np.log(jac_det).std(),
        "dice": np.nanmean(dice),
        "dice_per_label": dice,
        "hd95": np.nanmean(hd95),
        "hd95_per_label": hd95,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_official_on_random_fields(seed):
    shape = (14, 12, 13)
    fixed = random_labels(shape, 3, seed)
    moving = random_labels(shape, 3, seed + 10)
    moving[moving == 3] = 0  # label 3 absent from the moving map: NaN path
    disp = smooth_field(shape, 8.0, seed)  # folds in every seed; seed 2 reaches J < -3 (the clip)
    labels = [1, 2, 3]

    ref = official_pair(fixed, moving, disp, labels)
    res = M.evaluate_pair(fixed, moving, disp, labels)

    np.testing.assert_array_equal(M.warp_labels_official(moving, disp), ref["warped"])
    jac_ref = official_jacobian_determinant(disp[np.newaxis].transpose(0, 4, 1, 2, 3))
    np.testing.assert_allclose(M.jacobian_determinant(disp), jac_ref, rtol=0, atol=1e-10)
    assert res["sdlogj"] == pytest.approx(ref["sdlogj"], abs=1e-10)
    assert res["folding_percent"] == pytest.approx(100 * np.mean(jac_ref <= 0)) and res["folding_percent"] > 0
    np.testing.assert_allclose(res["dice_per_label"], ref["dice_per_label"], atol=1e-10)
    np.testing.assert_allclose(res["hd95_per_label"], ref["hd95_per_label"], atol=1e-10)
    assert res["dice"] == pytest.approx(ref["dice"], abs=1e-10)
    assert res["hd95"] == pytest.approx(ref["hd95"], abs=1e-10)
    assert np.isnan(res["dice_per_label"][2])
