import math
import warnings

import numpy as np
import pytest
import torch

from masktune_core.masking import apply_masks, threshold_masks


def official_rule(maps: np.ndarray, k: float) -> np.ndarray:
    """The official mask_heatmap_using_threshold (numpy nanmean/nanstd), as a reference: True = masked."""
    positive = np.where(maps > 0, maps, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: tau is NaN, nothing masked
        tau = np.nanmean(positive, axis=(1, 2))[:, None, None] + k * np.nanstd(positive, axis=(1, 2))[:, None, None]
    return maps > tau


def test_hand_computed_threshold():
    # positives 1, 2, 3: mean 2, population std sqrt(2/3)
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    std = math.sqrt(2 / 3)
    assert 2 + 2 * std > 3  # k = 2: tau = 3.63, nothing masked
    assert not threshold_masks(maps, 2.0).any()
    assert threshold_masks(maps, 1.0).tolist() == [[[False, False], [False, True]]]  # tau = 2.82
    assert threshold_masks(maps, 0.0).tolist() == [[[False, False], [False, True]]]  # tau = 2, strict >


def test_zeros_do_not_count_towards_the_statistics():
    # positives: four 0.1 and one 1.0, among eleven zeros
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, :4] = 0.1
    maps[0, 3, 3] = 1.0
    values = np.array([0.1, 0.1, 0.1, 0.1, 1.0])
    tau = values.mean() + 1.5 * values.std()
    assert tau < 1.0
    masks = threshold_masks(maps, 1.5)
    assert masks.sum() == 1 and masks[0, 3, 3]
    # Counting the zeros too would lower tau enough to mask the 0.1 pixels as well.
    all_values = maps.flatten().numpy()
    assert (all_values > all_values.mean()).sum() == 5
    assert threshold_masks(maps, 0.0).sum() == 1


def test_undefined_threshold_masks_nothing():
    maps = torch.stack([torch.zeros(5, 5), -torch.rand(5, 5)])
    assert not threshold_masks(maps, 2.0).any()


def test_single_positive_value_is_not_masked():
    maps = torch.zeros(1, 3, 3)
    maps[0, 1, 1] = 0.7  # std 0 -> tau = 0.7, and 0.7 > 0.7 is false
    assert not threshold_masks(maps, 2.0).any()


@pytest.mark.parametrize("k", [0.0, 1.0, 2.0, 3.0])
def test_matches_official_rule_on_random_maps(k):
    rng = np.random.default_rng(int(k))
    maps = rng.random((16, 28, 28)).astype(np.float32)
    maps[maps < 0.3] = 0  # grad-cam maps have zero regions
    maps[3] = 0  # and sometimes nothing positive
    ours = threshold_masks(torch.from_numpy(maps), k).numpy()
    assert (ours == official_rule(maps, k)).all()


def test_apply_masks_zeroes_every_channel_in_raw_pixels():
    images = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    out = apply_masks(images, masks)
    assert out.dtype == torch.uint8
    assert (out[0, :, 1, 2] == 0).all()
    assert out.sum().item() == 200 * (2 * 3 * 16 - 3)
    assert torch.equal(out[1], images[1])
