"""From saliency maps to masks, and from masks to masked images.

The rule is the official ``mask_heatmap_using_threshold``: per image,
tau = mean + k * std (population std) of the strictly positive map values, and
the pixels with map > tau are masked. An image with no positive value has no
tau, and nothing of it is masked.
"""

from __future__ import annotations

import numpy as np
import torch


def threshold_masks(maps: torch.Tensor, threshold_std: float = 2.0) -> torch.Tensor:
    """[N, H, W] saliency maps -> [N, H, W] bool, True where the pixel is masked."""
    flat = maps.flatten(1)
    positive = flat > 0
    count = positive.sum(dim=1, keepdim=True)
    values = torch.where(positive, flat, torch.zeros_like(flat))
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    variance = (torch.where(positive, flat - mean, torch.zeros_like(flat)) ** 2).sum(dim=1, keepdim=True) / count.clamp(min=1)
    tau = mean + threshold_std * variance.sqrt()
    masks = (flat > tau) & (count > 0)
    return masks.view_as(maps)


def apply_masks(images_u8: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Zero the masked pixels in raw uint8 space ([N, 3, H, W] images, [N, H, W] masks)."""
    return images_u8 * (~masks).unsqueeze(1).to(images_u8.dtype)


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """[N, H, W] bool -> uint8 [N, ceil(H*W/8)], a bit per pixel (how masks are stored)."""
    return np.packbits(masks.flatten(1).cpu().numpy(), axis=1)


def unpack_masks(packed: np.ndarray, side: int) -> torch.Tensor:
    """The inverse of ``pack_masks`` for square side x side masks."""
    bits = np.unpackbits(packed, axis=1, count=side * side).astype(bool)
    return torch.from_numpy(bits).view(len(packed), side, side)
