"""masktune_core.models: the registry, target layers, and weight I/O that never unpickles code."""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from masktune_core.errors import ModelError
from masktune_core.models import (
    architectures, create_model, load_weights, read_state_dict, saliency_target_layer, save_weights,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]


def _output_side(model: nn.Module, layer: nn.Module, size: int) -> tuple[int, ...]:
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    handle.remove()
    return shapes[-1]


# ---------------------------------------------------------------- SmallCNN


def test_small_cnn_is_the_official_architecture():
    model = create_model("small_cnn", 10, 28)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding, c.stride) for c in convs] == [
        (3, 16, (3, 3), (0, 0), (1, 1)), (16, 16, (3, 3), (0, 0), (1, 1)),
        (16, 32, (3, 3), (0, 0), (1, 1)), (32, 32, (3, 3), (0, 0), (1, 1)),
    ]
    kinds = [type(m).__name__ for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Linear, nn.BatchNorm1d))]
    assert kinds == [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Linear", "BatchNorm1d", "ReLU", "Linear",
    ]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert (linears[0].in_features, linears[0].out_features) == (512, 256)
    assert (linears[1].in_features, linears[1].out_features) == (256, 10)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    target = saliency_target_layer(model, "small_cnn", 28)
    assert isinstance(target, nn.ReLU)
    assert _output_side(model, target, 28) == (1, 32, 8, 8)
    # the target is the ReLU after the *last* conv, not an earlier one
    assert target is [m for m in model.modules() if isinstance(m, nn.ReLU)][3]
    model.train()
    assert model(torch.randn(4, 3, 28, 28)).shape == (4, 10)


def test_small_cnn_flatten_follows_input():
    model = create_model("small_cnn", 3, 32)
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert linear.in_features == 32 * 5 * 5
    assert _output_side(model, saliency_target_layer(model, "small_cnn", 32), 32) == (1, 32, 10, 10)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


# ---------------------------------------------------------------- ResNets
# Structure checks build on the meta device (shapes only, no weight init): same code path, a fraction of the time.


def _meta_model(name, num_classes, size):
    with torch.device("meta"):
        return create_model(name, num_classes, size)


def _meta_side(model, layer, size):
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.device("meta"):
        model.eval()(torch.zeros(1, 3, size, size))
    handle.remove()
    return shapes[-1]


@pytest.fixture(scope="module")
def r18_small():
    """A real (CPU) resnet18_small, shared by the tests that need actual weights."""
    torch.manual_seed(0)
    return create_model("resnet18_small", 3, 16).eval()


def test_resnet18_at_224():
    model = _meta_model("resnet18", 5, 224)
    assert model.fc.out_features == 5
    assert saliency_target_layer(model, "resnet18", 224) is model.layer4[-1]
    assert _meta_side(model, model.layer4[-1], 224)[-2:] == (7, 7)


def test_resnet18_at_64_uses_layer3():
    model = _meta_model("resnet18", 3, 64)
    assert saliency_target_layer(model, "resnet18", 64) is model.layer3[-1]
    assert _meta_side(model, model.layer4[-1], 64)[-2:] == (2, 2)
    assert _meta_side(model, model.layer3[-1], 64)[-2:] == (4, 4)


def test_resnet18_small_at_32():
    model = _meta_model("resnet18_small", 4, 32)
    assert saliency_target_layer(model, "resnet18_small", 32) is model.layer4[-1]
    assert _meta_side(model, model.layer4[-1], 32)[-2:] == (4, 4)
    assert model.fc.out_features == 4
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


@pytest.mark.parametrize("name, expected_fc_in", [("resnet34", 512), ("resnet50", 2048)])
def test_deeper_resnets_build(name, expected_fc_in):
    model = _meta_model(name, 7, 64)
    assert (model.fc.in_features, model.fc.out_features) == (expected_fc_in, 7)
    assert saliency_target_layer(model, name, 64) is model.layer3[-1]
    with torch.device("meta"):
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_resnet_real_forward_at_minimum(r18_small):
    with torch.no_grad():
        out = r18_small(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


# ---------------------------------------------------------------- registry errors


def test_unknown_architecture_lists_known_names():
    with pytest.raises(ModelError) as err:
        create_model("vgg_nonexistent", 2)
    msg = str(err.value)
    assert "vgg_nonexistent" in msg
    for known in ("small_cnn", "resnet18", "resnet50"):
        assert known in msg


@pytest.mark.parametrize("name, too_small", [("small_cnn", 10), ("resnet18", 16), ("resnet18_small", 8)])
def test_input_below_minimum(name, too_small):
    with pytest.raises(ModelError, match=name):
        create_model(name, 2, too_small)


@pytest.mark.parametrize("n", [0, 1])
def test_num_classes_below_two(n):
    with pytest.raises(ModelError, match="num_classes"):
        create_model("small_cnn", n, 28)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_small", "resnet50"])
def test_min_input_size_actually_runs(name):
    size = architectures()[name].min_input_size
    model = _meta_model(name, 2, size)
    with torch.device("meta"):
        assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 2)


def test_small_cnn_runs_at_its_declared_minimum_and_refuses_below():
    size = architectures()["small_cnn"].min_input_size
    model = create_model("small_cnn", 2, size).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 2)
    with pytest.raises(ModelError, match="at least"):
        create_model("small_cnn", 2, size - 1)


# ---------------------------------------------------------------- weights


def _trained_small_cnn(num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes, 28)
    model.train()
    with torch.no_grad():  # move BN running stats away from their defaults
        model(torch.randn(8, 3, 28, 28) * 3 + 1)
    return model.eval()


X = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def _fresh(num_classes=3, seed=123):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes, 28).eval()


def _same_outputs(a, b):
    with torch.no_grad():
        return torch.equal(a.eval()(X), b.eval()(X))


def test_safetensors_roundtrip(tmp_path):
    model = _trained_small_cnn()
    save_weights(model, tmp_path / "w.safetensors")
    other = _fresh()
    assert not _same_outputs(model, other)
    load_weights(other, tmp_path / "w.safetensors")
    assert _same_outputs(model, other)
    assert not list(tmp_path.glob("*.tmp"))


def test_state_dict_pt(tmp_path):
    model = _trained_small_cnn()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    other = _fresh()
    load_weights(other, tmp_path / "w.pt")
    assert _same_outputs(model, other)


def test_state_dict_wrapper_and_dataparallel_prefix(tmp_path):
    model = _trained_small_cnn()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": prefixed, "epoch": 3}, tmp_path / "ckpt.pth")
    other = _fresh()
    load_weights(other, tmp_path / "ckpt.pth")
    assert _same_outputs(model, other)
    save_file({k: v.contiguous() for k, v in prefixed.items()}, str(tmp_path / "dp.safetensors"))
    third = _fresh(seed=7)
    load_weights(third, tmp_path / "dp.safetensors")
    assert _same_outputs(model, third)


def test_mismatched_num_classes_names_the_tensor(tmp_path):
    save_weights(_trained_small_cnn(num_classes=3), tmp_path / "w.safetensors")
    with pytest.raises(ModelError) as err:
        load_weights(_fresh(num_classes=2), tmp_path / "w.safetensors")
    msg = str(err.value)
    assert "linear.3.weight" in msg and "linear.3.bias" in msg
    assert "(3, 256)" in msg and "(2, 256)" in msg


def test_other_architecture_names_missing_and_unexpected(tmp_path, r18_small):
    save_weights(_trained_small_cnn(), tmp_path / "cnn.safetensors")
    before = {k: v.clone() for k, v in r18_small.state_dict().items()}
    with pytest.raises(ModelError) as err:
        load_weights(r18_small, tmp_path / "cnn.safetensors")
    parts = {p.strip().split(" ")[0]: p for p in str(err.value).split(":", 1)[1].split(";")}
    assert "bn1" in parts["missing"]  # the model's tensors the file lacks
    assert "'backbone.0.bias'" in parts["unexpected"]  # the file's tensors the model lacks
    assert all(torch.equal(before[k], v) for k, v in r18_small.state_dict().items())


def test_resnet_safetensors_roundtrip(tmp_path, r18_small):
    assert not any(k.startswith("_target") for k in r18_small.state_dict())
    save_weights(r18_small, tmp_path / "r.safetensors")
    other = copy.deepcopy(r18_small)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 16, 16)
    load_weights(other, tmp_path / "r.safetensors")
    with torch.no_grad():
        assert torch.equal(other(x), r18_small(x))


def test_nan_weights(tmp_path):
    model = _trained_small_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["backbone.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    target = _fresh()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ModelError, match="backbone.0.weight"):
        load_weights(target, tmp_path / "nan.safetensors")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_malicious_pickle_is_never_run(tmp_path, suffix):
    marker = tmp_path / "pwned"
    payload = {"linear.3.weight": torch.zeros(3, 256), "evil": _Evil(marker)}
    path = tmp_path / f"evil{suffix}"
    torch.save(payload, path)
    with pytest.raises(ModelError):
        load_weights(_fresh(), path)
    with pytest.raises(ModelError):
        read_state_dict(path)
    assert not marker.exists()


def test_malicious_raw_pickle_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ModelError):
        load_weights(_fresh(), path)
    assert not marker.exists()


def _safetensors_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


@pytest.mark.parametrize("case", ["header_too_long", "offsets_out_of_range", "offsets_shape_mismatch", "bad_json", "huge_header"])
def test_lying_safetensors(tmp_path, case):
    data = bytes(16)
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "header_too_long":
        blob = _safetensors_bytes(good, data, header_len=10_000)
    elif case == "offsets_out_of_range":
        blob = _safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}}, data)
    elif case == "offsets_shape_mismatch":
        blob = _safetensors_bytes({"w": {"dtype": "F32", "shape": [100, 100], "data_offsets": [0, 16]}}, data)
    elif case == "bad_json":
        blob = struct.pack("<Q", 16) + b"{not json!!!!!!}" + data
    else:
        blob = struct.pack("<Q", (1 << 63) - 1) + b"{}"
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    # the well-formed variant of the same bytes does load: the failures below are about the lies
    ok = tmp_path / "ok.safetensors"
    ok.write_bytes(_safetensors_bytes(good, data))
    assert set(read_state_dict(ok)) == {"w"}
    with pytest.raises(ModelError):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError):
        load_weights(_fresh(), path)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelError):
        load_weights(_fresh(), tmp_path / "list.pt")
    torch.save({"a": 1, "b": "x"}, tmp_path / "nontensor.pt")
    with pytest.raises(ModelError):
        load_weights(_fresh(), tmp_path / "nontensor.pt")
