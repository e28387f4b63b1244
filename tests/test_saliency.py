import pytest
import torch

from masktune_core.models import create_model, saliency_target_layer
from masktune_core.saliency import library_cam, saliency_maps, xgradcam


def _trained_ish(arch: str, size: int, classes: int = 3) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the identity, so eval mode matters."""
    torch.manual_seed(0)
    model = create_model(arch, classes, size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, size, size) * 2)
    return model


# One architecture per family, at small inputs where the family allows; the target layer is the
# generic rule's (the ResNet rule for ResNets), so these also check that grad-cam can read it.
@pytest.mark.parametrize("arch,size", [
    ("small_cnn", 28), ("resnet18", 64), ("resnet18_small", 32), ("densenet121", 64), ("vgg11_bn", 64),
    ("efficientnet_b0", 64), ("mobilenet_v3_small", 64), ("convnext_tiny", 64), ("regnet_x_400mf", 64),
    ("timm/resnet18", 64), ("timm/convnext_atto", 64), ("timm/efficientnet_b0", 64),
])
def test_xgradcam_equals_pytorch_grad_cam(arch, size):
    model = _trained_ish(arch, size)
    inputs = torch.rand(6, 3, size, size)
    target = saliency_target_layer(model, arch, size)
    ours, predicted = xgradcam(model, target, inputs)
    reference, reference_predicted = library_cam("xgradcam_reference", model, target, inputs)
    assert ours.shape == (6, size, size)
    assert torch.equal(predicted, reference_predicted)
    assert (ours - reference).abs().max().item() < 1e-4
    assert ours.min() >= 0 and ours.max() <= 1 + 1e-6


def test_maps_are_for_the_predicted_class():
    model = _trained_ish("small_cnn", 28)
    model.eval()
    inputs = torch.rand(4, 3, 28, 28)
    maps, predicted = xgradcam(model, saliency_target_layer(model, "small_cnn", 28), inputs)
    assert torch.equal(predicted, model(inputs).argmax(1))
    # Per image, only the predicted class's logit drives the map: computing image 0 alone gives the same map.
    single, _ = xgradcam(model, saliency_target_layer(model, "small_cnn", 28), inputs[:1])
    assert torch.allclose(single[0], maps[0], atol=1e-5)


@pytest.mark.parametrize("method", ["xgradcam", "gradcam", "gradcam++"])
def test_model_state_is_restored(method):
    model = _trained_ish("small_cnn", 28)
    model.train()
    model.linear[-1].weight.requires_grad_(False)
    grad = torch.full_like(model.linear[0].weight, 0.5)
    model.linear[0].weight.grad = grad.clone()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    maps, _ = saliency_maps(method, model, saliency_target_layer(model, "small_cnn", 28), torch.rand(3, 3, 28, 28))
    assert maps.shape == (3, 28, 28) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert model.training
    assert model.linear[-1].weight.requires_grad is False
    assert model.linear[0].weight.requires_grad is True
    assert torch.equal(model.linear[0].weight.grad, grad)
    assert model.backbone[0].weight.grad is None
    for k, v in model.state_dict().items():  # eval mode: BatchNorm statistics untouched
        assert torch.equal(v, params_before[k]), k
    assert not saliency_target_layer(model, "small_cnn", 28)._forward_hooks
