"""Hostile and broken uploads through the real service (HTTP, worker process, PostgreSQL, Redis).

Every case: a clear 4xx or an `invalid` upload whose reason names the problem, nothing
written outside the service's storage, no code from an upload ever runs, and the
service keeps serving.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from masktune_core import create_model
from stack import running
from test_service_e2e import upload_dataset, wait_for

OUTSIDE = Path("/tmp")  # where an absolute path lands


def png(colour=(200, 30, 30), size=(12, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buf, "PNG")
    return buf.getvalue()


def good_members() -> dict[str, bytes]:
    """A trainable two-class ImageFolder: the hostile part comes on top."""
    members = {}
    for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        for i in range(6):
            members[f"train/{label}/{i}.png"] = png(tuple(min(255, c + 5 * i) for c in colour))
    return members


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("hostile"), worker=True) as stack:
        yield stack


@pytest.fixture(autouse=True)
def still_serving(client):
    yield
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/datasets", params={"limit": 1}).status_code == 200


def invalid(client, payload: bytes, name="data.zip") -> str:
    dataset = upload_dataset(client, payload, name)
    assert dataset["status"] == "invalid", dataset
    return dataset["error"]


def ready(client, payload: bytes, name="data.zip") -> dict:
    dataset = upload_dataset(client, payload, name)
    assert dataset["status"] == "ready", dataset
    return dataset


# ---------------------------------------------------------------- archives


def landed(name: str, *trees: Path) -> list[Path]:
    """Every file called ``name`` in the trees (or directly in OUTSIDE)."""
    found = [OUTSIDE / name] if (OUTSIDE / name).exists() else []
    for tree in trees:
        found += [Path(d) / name for d, _, files in os.walk(tree) if name in files]
    return found


@pytest.mark.parametrize("make", [make_zip, make_tar], ids=["zip", "tar.gz"])
@pytest.mark.parametrize("template", ["../../../../../tmp/{}.txt", "/tmp/{}.txt", "train/../../{}.txt"])
def test_member_paths_escaping_the_archive(client, stack, tmp_path_factory, make, template):
    marker = f"escape-{secrets.token_hex(4)}"
    members = {**good_members(), template.format(marker): b"owned"}
    reason = invalid(client, make(members))
    assert "absolute" in reason or "outside" in reason
    # Relative members would land relative to the worker's unpack folder, deep in the service's
    # data folder under the test tree: search all of it, not only OUTSIDE.
    assert landed(f"{marker}.txt", tmp_path_factory.getbasetemp(), Path(stack.env["MASKTUNE_DATA_DIR"])) == []


def test_links_and_devices_in_tar_are_never_written(client, stack):
    links = []
    for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "/etc/passwd"), (tarfile.CHRTYPE, "")):
        info = tarfile.TarInfo(f"train/cat/link{kind.decode()}.png")
        info.type, info.linkname = kind, target
        links.append(info)
    dataset = ready(client, make_tar(good_members(), links))
    assert dataset["summary"]["splits"]["train"]["images"] + dataset["summary"]["splits"]["val"]["images"] == 12
    assert not [p for p in (stack.tmp / "data").rglob("*") if p.is_symlink()]


def test_zip_bomb_stops_while_extracting(client):
    bomb = {**good_members(), "train/cat/huge.png": b"\0" * (80 << 20)}  # 80 MB of zeros deflate ~1000x
    payload = make_zip(bomb)
    assert len(payload) < 1 << 20
    assert "inflates" in invalid(client, payload)


def test_nested_archives_are_not_unpacked(client):
    inner = make_zip(good_members())
    dataset = ready(client, make_zip({**good_members(), "train/cat/inner.zip": inner}))
    assert dataset["summary"]["splits"]["train"]["images"] + dataset["summary"]["splits"]["val"]["images"] == 12
    assert "no training images" in invalid(client, make_zip({"data/inner.zip": inner}))


@pytest.mark.parametrize("payload,reason", [
    (b"%PDF-1.4 not an archive at all" * 10, "not a .zip"),
    (png(), "not a .zip"),
    (b"PK\x03\x04" + b"\x00" * 40, "archive"),  # a zip header with nothing behind it
])
def test_not_an_archive(client, payload, reason):
    assert reason in invalid(client, payload)


def test_empty_upload_is_refused_at_once(client):
    response = client.post("/v1/datasets", files={"file": ("empty.zip", b"")})
    assert response.status_code == 422 and response.json()["code"] == "empty_file"


def test_duplicate_member_names(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in good_members().items():
            zf.writestr(name, data)
        with pytest.warns(UserWarning):
            zf.writestr("train/cat/0.png", png((1, 2, 3)))
    assert "twice" in invalid(client, buf.getvalue())


# ---------------------------------------------------------------- images


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the pixel data is a few bytes."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_broken_images_are_skipped_and_reported(client):
    members = good_members()
    members["train/cat/bomb.png"] = png_claiming(100_000, 100_000)
    members["train/cat/truncated.png"] = png()[:40]
    members["train/dog/garbage.png"] = secrets.token_bytes(300)
    members["train/dog/notes.txt"] = b"not an image, not an image suffix"
    dataset = ready(client, make_zip(members))
    reasons = {item["file"]: item["reason"] for item in dataset["summary"]["skipped"]}
    assert "over the limit" in reasons["train/cat/bomb.png"]
    assert set(reasons) == {"train/cat/bomb.png", "train/cat/truncated.png", "train/dog/garbage.png"}
    assert dataset["summary"]["skipped_count"] == 3


def test_unusual_modes_are_converted(client):
    members = good_members()
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)).save(buf, "PNG")
    members["train/cat/sixteen_bit.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("CMYK", (10, 10), (0, 200, 200, 0)).save(buf, "JPEG")
    members["train/cat/cmyk.jpg"] = buf.getvalue()
    members["train/dog/palette.png"] = png((3,), mode="P")
    members["train/dog/alpha.png"] = png((10,), mode="LA")
    dataset = ready(client, make_zip(members))
    assert dataset["summary"]["skipped_count"] == 0
    assert {"I;16", "CMYK", "P", "LA", "RGB"} <= set(dataset["summary"]["image_sizes"]["modes"])


def test_a_class_left_without_images_fails_the_dataset(client):
    members = {k: v for k, v in good_members().items() if k.startswith("train/cat")}
    members.update({f"train/dog/{i}.png": b"broken" for i in range(3)})
    assert "no usable training image" in invalid(client, make_zip(members))


# ---------------------------------------------------------------- manifests


def manifest_zip(lines: list[str], encoding="utf-8") -> bytes:
    members = {f"img/{i}.png": png((10 * i, 0, 0)) for i in range(20)}
    members["metadata.csv"] = "\n".join(lines).encode(encoding)
    return make_zip(members)


def test_manifest_rows_outside_or_missing_are_skipped(client):
    rows = ["filename,label"] + [f"img/{i}.png,{i % 2}" for i in range(20)]
    rows += ["../../etc/passwd,0", "/etc/passwd,1", "img/missing.png,0", "img/0.png,"]
    dataset = ready(client, manifest_zip(rows))
    reasons = " | ".join(item["reason"] for item in dataset["summary"]["skipped"])
    assert dataset["summary"]["skipped_count"] == 4
    assert "outside" in reasons and "absolute" in reasons and "no such file" in reasons and "empty label" in reasons


@pytest.mark.parametrize("lines,encoding,reason", [
    (["filename,label,split", "img/0.png,0,train", "img/1.png,1,holdout"], "utf-8", "unknown split"),
    (["name,class", "img/0.png,0"], "utf-8", "needs the columns"),
    (["filename,label", "img/0.png,ch\u00e9vre"], "latin-1", "not UTF-8"),
    (["filename,label", "img/0.png," + "x" * 200_000], "utf-8", "not a readable CSV"),
])
def test_broken_manifests(client, lines, encoding, reason):
    assert reason in invalid(client, manifest_zip(lines, encoding))


# ---------------------------------------------------------------- model weights


def upload_model(client, payload: bytes, name: str, architecture="small_cnn", num_classes=2) -> dict:
    response = client.post("/v1/models", files={"file": (name, payload)},
                           data={"architecture": architecture, "num_classes": str(num_classes)})
    assert response.status_code == 201, response.text
    return wait_for(client, f"/v1/models/{response.json()['id']}", lambda m: m["status"] != "validating", 60)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_never_run(client, tmp_path):
    marker = OUTSIDE / f"pwned-{secrets.token_hex(4)}"
    buf = io.BytesIO()
    torch.save({"linear.3.weight": _Exploit(marker)}, buf)
    model = upload_model(client, buf.getvalue(), "weights.pt")
    assert model["status"] == "invalid" and "pickled Python objects, which are never loaded" in model["error"]
    assert "state_dict()" in model["error"]  # and what to send instead
    assert not marker.exists()


def test_safetensors_header_that_lies(client):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    lying = struct.pack("<Q", len(header)) + header + b"\0" * 16
    assert upload_model(client, lying, "w.safetensors")["status"] == "invalid"
    too_long = struct.pack("<Q", 10**12) + b"{}"
    assert upload_model(client, too_long, "w.safetensors")["status"] == "invalid"


def test_weights_that_fit_no_architecture_or_hold_nan(client, tmp_path):
    resnet = create_model("resnet18_small", 2)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(path))
    model = upload_model(client, path.read_bytes(), "resnet.safetensors")
    assert model["status"] == "invalid" and "do not fit" in model["error"]

    state = create_model("small_cnn", 3).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = upload_model(client, path.read_bytes(), "three.safetensors")
    assert "linear.3.weight" in model["error"] and "(3, 256)" in model["error"]

    state = create_model("small_cnn", 2).state_dict()
    state["linear.0.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = upload_model(client, path.read_bytes(), "nan.safetensors")
    assert "NaN" in model["error"]
