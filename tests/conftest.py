"""Shared test settings and helpers: one CPU thread (a training job may share the machine), tiny tensors."""

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

torch.set_num_threads(1)

# Real data for the tests that need it: hippocampus_msd/ (MSD Task04 cases: imagesTr/, labelsTr/,
# dataset.json) and abdomen_ct_samples/ (two abdominal CTs with organ labels, NIfTI and DICOM).
# BUNDLE_TEST_DATA names the folder holding them (default: ../shared/data next to the bundle, where
# the project's CI has them); the tests that need them are skipped where they are missing.
DATA = Path(os.environ.get("BUNDLE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HIPPO = DATA / "hippocampus_msd"
CT = DATA / "abdomen_ct_samples"


def smooth_volume(shape, sigma=2.0, seed=0):
    """Smooth random texture in [0, 1], float32 numpy array of ``shape``."""
    rng = np.random.default_rng(seed)
    vol = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return ((vol - vol.min()) / (vol.max() - vol.min())).astype(np.float32)


def smooth_ddf(shape, amplitude, seed=0, sigma=2.0):
    """Random smooth displacement (3, *shape) in voxels with max |u| == amplitude, float32 numpy."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *shape))
    field = np.stack([scipy.ndimage.gaussian_filter(noise[c], sigma) for c in range(3)])
    return (amplitude * field / np.abs(field).max()).astype(np.float32)


def map_coordinates_warp(image, ddf, order):
    """Reference pull warp of one (H, W, D) array by a (3, H, W, D) voxel DDF with scipy, as the
    Learn2Reg evaluation does: ``map_coordinates(image, identity + ddf)``."""
    identity = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"))
    return scipy.ndimage.map_coordinates(image, identity + ddf, order=order, mode="nearest")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Tests that share a module-scoped fixture (a prepared dataset, a trained network, a server) form
    one xdist group, so that ``-n 2`` (with ``--dist loadgroup``, pytest.ini) builds the fixture once
    instead of once in each worker process. Others are spread one by one."""
    parent = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        names = [
            n
            for n in (info.names_closure if info else [])
            if n in info.name2fixturedefs and info.name2fixturedefs[n][-1].scope == "module"
        ]
        keys = [(item.module.__name__, n) for n in names]
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        if keys:
            shared[item] = keys[0]
    for item, key in shared.items():
        root = find(key)
        item.add_marker(pytest.mark.xdist_group(f"{root[0]}.{root[1]}"))
