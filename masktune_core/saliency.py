"""Saliency maps for the predicted class, batched on the model's device.

``xgradcam`` is computed here directly: one forward pass whose graph starts at
the target layer's activation A (the layers before it record no graph), then
``autograd.grad`` of the predicted logits w.r.t. A only. That is the same
quantity as ``pytorch_grad_cam.XGradCAM``, which backpropagates into every
weight and round-trips through numpy; the test suite holds the two equal.
The other methods run on pytorch_grad_cam itself.

A map is ReLU(sum_k w_k A_k), min-max normalised per image, bilinearly resized
to the input and normalised again, exactly as grad-cam post-processes it.

Under ``autocast`` (bf16 or fp16 on a GPU) only the network's forward and backward
run in low precision; the weights, the weighted sum and the normalisation are fp32.
The grad-cam library's methods always run in fp32 (they pass tensors through numpy).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-7


@contextmanager
def _inference_state(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; train/eval mode, requires_grad and .grad restored afterwards."""
    was_training = model.training
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def _normalize_per_image(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (_EPS + flat.max(dim=1, keepdim=True).values)
    return flat.view_as(maps)


def postprocess(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, h, w] raw weighted activations -> [N, H, W] maps in 0..1 (grad-cam's scale_cam_image twice)."""
    cam = _normalize_per_image(cam.clamp(min=0))
    cam = F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return _normalize_per_image(cam.clamp(min=0))


def xgradcam(model: nn.Module, target_layer: nn.Module, inputs: torch.Tensor,
             autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [N, H, W] in 0..1, predicted classes [N]) for a batch of normalised inputs; the network
    runs under autocast to ``autocast`` when given."""
    captured: dict[str, torch.Tensor] = {}

    def cut_graph_here(module, args, output):
        # Later layers see a leaf that requires grad: the graph (and the
        # backward pass) start here instead of at the input.
        activation = output.detach().requires_grad_(True)
        captured["A"] = activation
        return activation

    with _inference_state(model):
        for p in model.parameters():
            p.requires_grad_(False)
        handle = target_layer.register_forward_hook(cut_graph_here)
        try:
            with torch.enable_grad():
                with torch.autocast(inputs.device.type, dtype=autocast, enabled=autocast is not None):
                    logits = model(inputs)
                predicted = logits.argmax(dim=1)
                score = logits.float().gather(1, predicted[:, None]).sum()
                (grads,) = torch.autograd.grad(score, captured["A"])
        finally:
            handle.remove()
        activations, grads = captured["A"].detach().float(), grads.float()
        weights = (grads * activations).sum(dim=(2, 3)) / (activations.sum(dim=(2, 3)) + _EPS)
        cam = (weights[:, :, None, None] * activations).sum(dim=1)
        return postprocess(cam, tuple(inputs.shape[-2:])), predicted


def _grad_cam_library(method: str):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, XGradCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam_reference": XGradCAM}[method]


def library_cam(method: str, model: nn.Module, target_layer: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pytorch_grad_cam method for the predicted class, with the model's state restored."""
    with _inference_state(model):
        with torch.no_grad():
            predicted = model(inputs).argmax(dim=1)
        with _grad_cam_library(method)(model=model, target_layers=[target_layer]) as cam:
            maps = cam(input_tensor=inputs, targets=None)
    return torch.from_numpy(maps).to(inputs.device), predicted


def saliency_maps(method: str, model: nn.Module, target_layer: nn.Module, inputs: torch.Tensor,
                  autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "xgradcam":
        return xgradcam(model, target_layer, inputs, autocast)
    return library_cam(method, model, target_layer, inputs)
