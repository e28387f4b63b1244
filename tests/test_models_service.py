"""Issue #7 through the real service: library checkpoints uploaded as they come, a new head on an
ImageNet checkpoint, ImageNet weights from the workers' planted caches, outputs that load strict into
the plain torchvision/timm model, and GET /v1/architectures from the workers' report.
"""

from __future__ import annotations

import argparse
import io
import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load, save

from masktune_core.data import decode_dataset, index_dataset
from masktune_core.training import LoopSettings, accuracy, predict_logits
from stack import running
from test_library_models import plant_timm_weights
from test_service_e2e import run_job, wait_for

SMALL = {"erm": {"epochs": 1, "batch_size": 64}, "masking": {"batch_size": 64}, "preview_count": 0,
         "data": {"input_size": 32}}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A torchvision checkpoint for mobilenet_v3_small and timm's convnext_atto in the workers' caches."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    (root / "torch/hub/checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(),
               root / "torch/hub/checkpoints/mobilenet_v3_small-047dcff4.pth")
    plant_timm_weights(root / "hf/hub", "convnext_atto.d2_in1k", timm.create_model("convnext_atto"))
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory, caches):
    with running(tmp_path_factory.mktemp("stack"), worker=True, MASKTUNE_REPORT_CATALOG="1",
                 TORCH_HOME=str(caches / "torch"), HF_HOME=str(caches / "hf")) as stack:
        yield stack


@pytest.fixture(scope="module")
def catalog(client):
    return wait_for(client, "/v1/architectures", lambda c: c["reported_at"] is not None, 240)


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _upload(client, name: str, payload: bytes, architecture: str, num_classes: int) -> dict:
    response = client.post("/v1/models", files={"file": (name, payload)},
                           data={"architecture": architecture, "num_classes": str(num_classes)})
    assert response.status_code == 201, response.text
    return wait_for(client, f"/v1/models/{response.json()['id']}", lambda m: m["status"] != "validating", 120)


def _test_accuracy(model: torch.nn.Module, tiny_digits, card: dict, cache) -> float:
    size = card["input_size"][-1]
    assert card["normalization"] is None and "no crop" in card["resize"]
    test = decode_dataset(index_dataset(tiny_digits), size, cache).splits["test"]
    return accuracy(predict_logits(model.eval(), test, 64, LoopSettings(device=torch.device("cpu"))), test.labels)


def _artifacts(client, job: dict) -> dict[str, bytes]:
    names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert {"model.safetensors", "erm.safetensors", "model_card.json", "metrics.json", "config.json"} <= names
    return {n: client.get(f"/v1/jobs/{job['id']}/artifacts/{n}").content for n in names}


def test_architectures_as_the_workers_report_them(stack, client, catalog):
    assert stack.client(None).get("/v1/architectures").status_code == 401
    by_name = {a["name"]: a for a in catalog["data"]}
    assert by_name["resnet50"]["target_layer"] == "layer4.2" and by_name["resnet50"]["default_input_size"] == 224
    assert by_name["small_cnn"]["target_layer"] == "backbone.12" and by_name["small_cnn"]["pretrained_available"] is None
    assert by_name["mobilenet_v3_small"]["pretrained_available"] is True
    assert by_name["resnet18"]["pretrained_available"] is False
    assert by_name["timm/convnext_atto"]["pretrained_available"] is True and by_name["timm/convnext_atto"]["library"] == "timm"
    assert {"densenet121", "vgg16_bn", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"} <= set(by_name)
    assert catalog["versions"]["timm"] == timm.__version__


def test_library_checkpoints_are_accepted_and_hostile_ones_explained(client):
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(num_classes=2).state_dict()
    accepted = {
        "torchvision": ("m.pt", _pt(r18), "resnet18"),
        "dataparallel": ("dp.pth", _pt({f"module.{k}": v for k, v in r18.items()}), "resnet18"),
        "lightning": ("l.ckpt.pt", _pt({"state_dict": {f"model.{k}": v for k, v in r18.items()}, "epoch": 4}), "resnet18"),
        "timm": ("t.safetensors", save(timm.create_model("convnext_atto", num_classes=2).state_dict()), "timm/convnext_atto"),
    }
    for kind, (name, payload, arch) in accepted.items():
        model = _upload(client, name, payload, arch, 2)
        assert model["status"] == "ready", (kind, model)

    imagenet_head = _upload(client, "in1k.pt", _pt(torchvision.models.resnet18().state_dict()), "resnet18", 2)
    assert imagenet_head["status"] == "invalid"
    assert "num_classes=1000" in imagenet_head["error"] and "model.head='replace'" in imagenet_head["error"]
    pickled = _upload(client, "p.pt", _pt({"state_dict": r18, "args": argparse.Namespace(lr=0.1)}), "resnet18", 2)
    assert pickled["status"] == "invalid" and "pickled" in pickled["error"] and "state_dict()" in pickled["error"]
    timm_as_tv = _upload(client, "e.safetensors", save(timm.create_model("efficientnet_b0", num_classes=2).state_dict()),
                         "efficientnet_b0", 2)
    assert timm_as_tv["status"] == "invalid" and "architecture=timm/efficientnet_b0" in timm_as_tv["error"]
    odd = dict(r18, **{"fc.weight": torch.zeros(2, 999)})
    neither = _upload(client, "odd.pt", _pt(odd), "resnet18", 2)
    assert neither["status"] == "invalid" and "fits neither" in neither["error"]
    vit = _upload(client, "v.safetensors", save({"x": torch.zeros(1)}), "timm/vit_tiny_patch16_224", 2)
    assert vit["status"] == "invalid" and "transformer" in vit["error"]


def test_imagenet_checkpoint_with_a_new_head_round_trips_into_plain_torchvision(client, dataset, tiny_digits, tmp_path):
    torch.manual_seed(1)
    upload = _upload(client, "in1k.safetensors", save(torchvision.models.mobilenet_v3_small().state_dict()),
                     "mobilenet_v3_small", 1000)
    assert upload["status"] == "ready", upload
    body = {"dataset_id": dataset["id"], **SMALL,
            "model": {"architecture": "mobilenet_v3_small", "weights_id": upload["id"]}}
    refused = client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and refused.json()["code"] == "num_classes_mismatch"
    assert "model.head" in refused.json()["detail"]
    body["model"]["head"] = "replace"
    job = run_job(client, body)
    assert job["status"] == "succeeded", job["error"]
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
    assert any("fresh 2-class head" in e["message"] and e["data"]["head_replaced"] for e in events)
    files = _artifacts(client, job)
    card = json.loads(files["model_card.json"])
    assert card["library"] == "torchvision" and card["class_names"] == ["0", "1"]
    model = torchvision.models.mobilenet_v3_small(num_classes=2)
    model.load_state_dict(load(files["model.safetensors"]))  # strict, no masktune code
    reported = json.loads(files["metrics.json"])["masktune"]["test"]["overall_accuracy"]
    assert _test_accuracy(model, tiny_digits, card, tmp_path / "cache") == pytest.approx(reported)


def test_timm_pretrained_from_the_workers_cache_round_trips_into_plain_timm(client, dataset, tiny_digits, catalog, tmp_path):
    job = run_job(client, {"dataset_id": dataset["id"], **SMALL,
                           "model": {"architecture": "timm/convnext_atto", "pretrained": True}})
    assert job["status"] == "succeeded", job["error"]
    files = _artifacts(client, job)
    card = json.loads(files["model_card.json"])
    assert (card["library"], card["architecture"]) == ("timm", "convnext_atto")
    model = timm.create_model("convnext_atto", num_classes=2)
    model.load_state_dict(load(files["erm.safetensors"]))
    model.load_state_dict(load(files["model.safetensors"]))
    reported = json.loads(files["metrics.json"])["masktune"]["test"]["overall_accuracy"]
    assert _test_accuracy(model, tiny_digits, card, tmp_path / "cache") == pytest.approx(reported)
    config = json.loads(files["config.json"])["config"]
    assert config["model"]["pretrained"] is True


def test_pretrained_weights_the_workers_lack_are_refused_at_creation(client, dataset, catalog):
    response = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL,
                                             "model": {"architecture": "resnet18", "pretrained": True}})
    assert response.status_code == 422 and response.json()["code"] == "pretrained_weights_missing"
