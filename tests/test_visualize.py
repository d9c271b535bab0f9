"""Tests of scripts/visualize.py: the pair figure and the postprocessing step that saves it."""

import numpy as np
import torch
from conftest import smooth_volume
from PIL import Image

from scripts.visualize import SavePairFigured


def _pair(shape=(16, 20, 24)):
    fixed, moving = smooth_volume(shape, seed=1), smooth_volume(shape, seed=2)
    label = (fixed > 0.5).astype(np.int64)
    return {
        "fixed_id": "0201",
        "moving_id": "0260",
        "moving_image": torch.from_numpy(moving)[None],
        "fixed_image": torch.from_numpy(fixed)[None],
        "warped_image": torch.from_numpy(moving)[None],
        "ddf": torch.zeros(3, *shape),
        "label": torch.nn.functional.one_hot(torch.from_numpy(label), 3).permute(3, 0, 1, 2),
        "warped_label": torch.from_numpy(label)[None],
    }


def test_saves_one_figure_per_pair_and_passes_the_data_on(tmp_path):
    data = _pair()
    out = SavePairFigured(str(tmp_path / "figs"))(data)
    assert out is data
    png = tmp_path / "figs" / "figure_0201_0260.png"
    width, height = Image.open(png).size
    assert width > 3 * height  # a row of five panels
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.std() > 10  # not a blank image


def test_disabled_writes_nothing(tmp_path):
    SavePairFigured(str(tmp_path / "figs"), enabled=False)(_pair())
    assert not (tmp_path / "figs").exists()
