"""Standard checkpoints in and out: torchvision's and timm's own key layouts, common wrappers,
a new head on a pretrained backbone, ImageNet weights from planted caches, presets, the model card.

Every checkpoint is made here from a randomly initialised library model (the same file format as
a pretrained one); no weights are downloaded.
"""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

from jobspec import PRESETS, JobConfig
from masktune_core.errors import ModelError, PretrainedWeightsMissing
from masktune_core.model_card import model_card
from masktune_core.models import (
    _cached_timm_names, create_model, describe_architecture, load_weights, pretrained_location, pretrained_state_dict,
    save_weights,
)

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(X), b.eval()(X))


def _tv_resnet18(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


def test_torchvision_state_dict_loads_as_is_and_ours_loads_into_torchvision(tmp_path):
    theirs = _tv_resnet18()
    torch.save(theirs.state_dict(), tmp_path / "m.pt")
    ours = create_model("resnet18", 2)
    assert type(ours) is torchvision.models.ResNet
    load_weights(ours, tmp_path / "m.pt", architecture="resnet18")
    assert _same(ours, theirs)
    save_weights(ours, tmp_path / "out.safetensors")
    plain = torchvision.models.resnet18(num_classes=2)
    plain.load_state_dict(load_file(tmp_path / "out.safetensors"))  # strict, no masktune code
    assert _same(plain, theirs)


def test_timm_state_dict_loads_as_is_and_ours_loads_into_timm(tmp_path):
    torch.manual_seed(0)
    theirs = timm.create_model("convnext_atto", num_classes=3).eval()
    save_file(theirs.state_dict(), str(tmp_path / "m.safetensors"))
    ours = create_model("timm/convnext_atto", 3)
    load_weights(ours, tmp_path / "m.safetensors", architecture="timm/convnext_atto")
    assert _same(ours, theirs)
    save_weights(ours, tmp_path / "out.safetensors")
    plain = timm.create_model("convnext_atto", num_classes=3)
    plain.load_state_dict(load_file(tmp_path / "out.safetensors"))
    assert _same(plain, theirs)


@pytest.mark.parametrize("name", ["densenet121", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "regnet_x_400mf"])
def test_every_family_round_trips_through_the_library_layout(tmp_path, name):
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, num_classes=3).eval()
    torch.save(theirs.state_dict(), tmp_path / "in.pt")
    ours = create_model(name, 3)
    load_weights(ours, tmp_path / "in.pt", architecture=name)
    save_weights(ours, tmp_path / "out.safetensors")
    plain = torchvision.models.get_model(name, num_classes=3)
    plain.load_state_dict(load_file(tmp_path / "out.safetensors"))
    assert _same(plain, theirs)


@pytest.mark.parametrize("wrap", [
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel / DDP
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},  # Lightning
    lambda sd: {"model_state_dict": {f"net.{k}": v for k, v in sd.items()}, "optimizer_step": 7},
    lambda sd: {"model": {f"module.backbone.{k}": v for k, v in sd.items()}},
])
def test_common_wrappers_are_undone(tmp_path, wrap):
    theirs = _tv_resnet18()
    torch.save(wrap(theirs.state_dict()), tmp_path / "ckpt.pth")
    ours = create_model("resnet18", 2)
    load_weights(ours, tmp_path / "ckpt.pth")
    assert _same(ours, theirs)


def test_imagenet_head_keep_refuses_naming_the_option_and_replace_loads_the_backbone(tmp_path):
    imagenet = _tv_resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pt")
    with pytest.raises(ModelError) as err:
        load_weights(create_model("resnet18", 2), tmp_path / "in1k.pt")
    assert "fc.weight" in str(err.value) and "num_classes=1000" in str(err.value) and "model.head='replace'" in str(err.value)
    torch.manual_seed(5)
    ours = create_model("resnet18", 2)
    fresh_fc = ours.fc.weight.clone()
    assert load_weights(ours, tmp_path / "in1k.pt", head="replace") is True
    assert torch.equal(ours.fc.weight, fresh_fc)
    assert torch.equal(ours.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


def test_a_head_that_fits_neither_is_refused(tmp_path):
    state = _tv_resnet18().state_dict()
    state["fc.weight"] = torch.zeros(2, 999)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="fits neither"):
        load_weights(create_model("resnet18", 2), tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="fc.weight"):
        load_weights(create_model("resnet18", 2), tmp_path / "odd.pt", head="replace")


def test_a_timm_checkpoint_sent_as_a_torchvision_name_says_which_name_to_use(tmp_path):
    torch.manual_seed(0)
    save_file(timm.create_model("efficientnet_b0", num_classes=2).state_dict(), str(tmp_path / "t.safetensors"))
    with pytest.raises(ModelError) as err:
        load_weights(create_model("efficientnet_b0", 2), tmp_path / "t.safetensors", architecture="efficientnet_b0")
    assert "architecture=timm/efficientnet_b0" in str(err.value)


def test_pickled_objects_beside_tensors_are_refused_with_what_to_send(tmp_path):
    state = dict(_tv_resnet18().state_dict())
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ckpt.pt")
    with pytest.raises(ModelError) as err:
        load_weights(create_model("resnet18", 2), tmp_path / "ckpt.pt")
    assert "pickled" in str(err.value) and "state_dict()" in str(err.value)


def test_vision_transformers_are_refused_clearly():
    from masktune_core.models import saliency_target_name

    model = create_model("timm/vit_tiny_patch16_224", 2, 224)
    with pytest.raises(ModelError, match="transformer"):
        saliency_target_name(model, "timm/vit_tiny_patch16_224", 224)
    with pytest.raises(ModelError, match="cannot run on 32 px"):
        saliency_target_name(model, "timm/vit_tiny_patch16_224", 32)


def test_unknown_timm_name():
    with pytest.raises(ModelError, match="timm has no model"):
        create_model("timm/not_a_model", 2)


# ---------------------------------------------------------------- pretrained weights from planted caches


def test_torchvision_pretrained_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    found, expected = pretrained_location("mobilenet_v3_small")
    assert found is None and "mobilenet_v3_small-047dcff4.pth" in expected and str(tmp_path) in expected
    with pytest.raises(PretrainedWeightsMissing) as err:
        pretrained_state_dict("mobilenet_v3_small")
    assert err.value.code == "pretrained_weights_missing" and "hub/checkpoints" in str(err.value)
    torch.manual_seed(0)
    planted = torchvision.models.mobilenet_v3_small().state_dict()
    (tmp_path / "torch/hub/checkpoints").mkdir(parents=True)
    torch.save(planted, tmp_path / "torch/hub/checkpoints/mobilenet_v3_small-047dcff4.pth")
    state = pretrained_state_dict("mobilenet_v3_small")
    assert all(torch.equal(state[k], v) for k, v in planted.items())


def test_a_run_asking_for_missing_pretrained_weights_fails_before_any_work(tmp_path, monkeypatch):
    from masktune_core import JobConfig as Config, MaskTuneRun

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    config = Config.model_validate({"model": {"architecture": "resnet18", "pretrained": True}})
    with pytest.raises(PretrainedWeightsMissing) as err:
        MaskTuneRun(tmp_path / "data.zip", tmp_path / "out", config)
    assert err.value.code == "pretrained_weights_missing"
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(err.value)


def plant_timm_weights(hub_cache, name: str, model: torch.nn.Module) -> None:
    """What `huggingface-cli download timm/<name>` leaves in the hub cache."""
    repo = hub_cache / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(model.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_timm_pretrained_from_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsMissing, match="models--timm--convnext_atto.d2_in1k"):
        pretrained_state_dict("timm/convnext_atto")
    torch.manual_seed(0)
    planted = timm.create_model("convnext_atto")
    plant_timm_weights(tmp_path / "hub", "convnext_atto.d2_in1k", planted)
    state = pretrained_state_dict("timm/convnext_atto")
    assert all(torch.equal(state[k], v) for k, v in planted.state_dict().items())
    assert {"timm/convnext_atto", "timm/convnext_atto.d2_in1k"} <= set(_cached_timm_names())
    names = {n: describe_architecture(n) for n in ("timm/convnext_atto", "resnet50", "small_cnn")}
    assert names["timm/convnext_atto"]["pretrained_available"] is True
    assert names["timm/convnext_atto"]["target_layer"] == "stages.3"
    assert names["resnet50"]["target_layer"] == "layer4.2" and names["small_cnn"]["pretrained_available"] is None


# ---------------------------------------------------------------- presets and the model card


def test_presets_fill_the_official_recipe_and_explicit_fields_win():
    config = JobConfig.model_validate({"preset": "waterbirds", "erm": {"epochs": 3}})
    assert config.preset == "waterbirds"
    assert (config.model.architecture, config.model.pretrained) == ("resnet50", True)
    assert (config.erm.lr, config.erm.batch_size, config.erm.epochs) == (0.0001, 128, 3)
    assert (config.data.input_size, config.data.normalization) == (224, "imagenet")
    # the stored (dumped) config validates to itself
    assert JobConfig.model_validate(config.model_dump(mode="json")) == config
    mnist = JobConfig.model_validate({"preset": "biased_mnist"})
    assert (mnist.model.architecture, mnist.erm.epochs, mnist.erm.lr) == ("small_cnn", 100, 0.01)
    uploaded = JobConfig.model_validate({"preset": "celeba", "model": {"weights_id": "mdl_x"}})
    assert uploaded.model.pretrained is False and uploaded.erm.batch_size == 512
    assert set(PRESETS) == {"biased_mnist", "waterbirds", "celeba"}


def test_model_card_says_how_to_rebuild_and_preprocess():
    card = model_card("resnet50", ["landbird", "waterbird"], 224, "imagenet")
    assert card["library"] == "torchvision" and card["architecture"] == "resnet50" and card["num_classes"] == 2
    assert card["class_names"] == ["landbird", "waterbird"] and card["input_size"] == [3, 224, 224]
    assert card["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert "torchvision.models.resnet50(num_classes=2)" in card["load"]
    timm_card = model_card("timm/convnext_atto", ["a", "b", "c"], 64, "none")
    assert timm_card["library"] == "timm" and 'timm.create_model("convnext_atto", num_classes=3)' in timm_card["load"]
    assert timm_card["normalization"] is None
    json.dumps(card)
