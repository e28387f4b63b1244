"""previews.png: per training image, the original, its saliency overlay, the mask and the masked image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam.utils.image import show_cam_on_image

COLUMNS = ("original", "saliency", "mask", "masked")
_HEADER = 16


def _cell_size(side: int) -> int:
    return side * max(1, 112 // side) if side < 112 else min(side, 224)


def render_previews(images_u8: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor, captions: list[str], path: Path) -> None:
    """Write a grid of len(images) rows x 4 columns as PNG (atomically)."""
    n, _, side, _ = images_u8.shape
    cell = _cell_size(side)
    sheet = Image.new("RGB", (cell * len(COLUMNS), _HEADER + n * (cell + _HEADER)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(COLUMNS):
        draw.text((c * cell + 4, 2), title, fill="black")
    for r in range(n):
        rgb = images_u8[r].permute(1, 2, 0).numpy()
        overlay = show_cam_on_image(rgb.astype(np.float32) / 255.0, maps[r].numpy(), use_rgb=True)
        mask = np.repeat((masks[r].numpy() * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        masked = rgb * (~masks[r].numpy())[:, :, None]
        top = _HEADER + r * (cell + _HEADER)
        draw.text((4, top + 2), captions[r], fill="black")
        for c, panel in enumerate((rgb, overlay, mask, masked)):
            tile = Image.fromarray(panel.astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (c * cell, top + _HEADER))
    tmp = path.with_name(path.name + ".tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(path)
