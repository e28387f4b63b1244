"""Real layouts and limits through the real service (HTTP, Celery worker, PostgreSQL, Redis),
with blob storage and the tenants' own datasets on an S3-compatible server (moto):
a CelebA dataset registered by s3:// URL runs a job; URLs outside a tenant's prefixes or
inside the service's own storage get 422; the archive member cap setting holds."""

from __future__ import annotations

import io
import json
import secrets
import zipfile
from pathlib import Path

import boto3
import pytest

from helpers import write_celeba
from stack import running
from test_blobs_s3 import s3_endpoint  # noqa: F401 (the moto server fixture)
from test_service_e2e import run_job, upload_dataset, wait_for

MEMBER_CAP = 40
JOB = {"erm": {"epochs": 1, "batch_size": 16}, "masking": {"batch_size": 16}, "preview_count": 2,
       "data": {"label_attribute": "Blond_Hair", "group_attribute": "Male"}}


@pytest.fixture(scope="module")
def s3(s3_endpoint):  # noqa: F811
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


@pytest.fixture(scope="module")
def celeba_prefix(s3, tmp_path_factory):
    """A CelebA-layout dataset unpacked under s3://masktune/tenant-data/celeba/."""
    root = write_celeba(tmp_path_factory.mktemp("celeba"), n=32, size=(12, 12))
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "masktune", f"tenant-data/celeba/{path.relative_to(root).as_posix()}")
    return "s3://masktune/tenant-data/celeba/"


@pytest.fixture(scope="module")
def stack(s3_endpoint, tmp_path_factory):  # noqa: F811
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "FSSPEC_S3_SKIP_INSTANCE_CACHE": "true",
           "MASKTUNE_BLOB_URL": f"s3://masktune/service-{secrets.token_hex(4)}",
           # Every tenant may name anything in the bucket, the service's own prefix included: the
           # blob-store refusal must hold regardless.
           "MASKTUNE_DATASET_URL_PREFIXES": json.dumps({"*": ["s3://masktune/"], "beta": ["s3://beta-data/"]}),
           "MASKTUNE_ARCHIVE_MAX_MEMBERS": str(MEMBER_CAP)}
    with running(tmp_path_factory.mktemp("sources"), worker=True, **env) as stack:
        yield stack


@pytest.fixture(scope="module")
def alpha(stack):
    with stack.client(stack.create_key("alpha")) as client:
        yield client


@pytest.fixture(scope="module")
def beta(stack):
    with stack.client(stack.create_key("beta")) as client:
        yield client


def register(client, url: str) -> dict:
    response = client.post("/v1/datasets", json={"url": url})
    assert response.status_code == 201, response.text
    return wait_for(client, f"/v1/datasets/{response.json()['id']}", lambda d: d["status"] != "validating", 60)


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_celeba_by_url_validates_from_a_listing_and_runs_a_job(alpha, celeba_prefix):
    dataset = register(alpha, celeba_prefix)
    assert dataset["status"] == "ready", dataset
    assert dataset["source_url"] == celeba_prefix.rstrip("/") and dataset["filename"] == "celeba"
    assert dataset["size_bytes"] > 0 and len(dataset["sha256"]) == 64
    summary = dataset["summary"]  # no attribute chosen yet: what the dataset offers
    assert summary["layout"] == "celeba" and summary["attributes"] == ["Blond_Hair", "Male", "Smiling"]
    assert summary["images"] == 32 and summary["partitions"] == {"train": 16, "val": 8, "test": 8}
    assert summary["sample"] == {"images": 32, "unreadable": []}

    job = run_job(alpha, {"dataset_id": dataset["id"], **JOB})
    assert job["status"] == "succeeded", job
    metrics = json.loads(alpha.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json").content)
    assert set(metrics["erm"]["test"]["per_group"]) == {"not_Blond_Hair/Male", "not_Blond_Hair/not_Male",
                                                       "Blond_Hair/Male", "Blond_Hair/not_Male"}
    config = json.loads(alpha.get(f"/v1/jobs/{job['id']}/artifacts/config.json").content)
    assert config["config"]["data"]["label_attribute"] == "Blond_Hair"

    failed = run_job(alpha, {"dataset_id": dataset["id"], "erm": {"epochs": 1}})
    assert failed["status"] == "failed" and "data.label_attribute" in failed["error"]["message"]


def test_data_changed_after_validation_fails_the_job(alpha, s3, celeba_prefix):
    s3.put_object(Bucket="masktune", Key="tenant-data/changing/list_eval_partition.txt", Body=b"000001.jpg 0\n")
    for key in ("img_align_celeba/000001.jpg", "list_attr_celeba.txt"):
        s3.copy_object(Bucket="masktune", Key=f"tenant-data/changing/{key}",
                       CopySource={"Bucket": "masktune", "Key": f"tenant-data/celeba/{key}"})
    dataset = register(alpha, "s3://masktune/tenant-data/changing")
    assert dataset["status"] == "ready", dataset
    s3.put_object(Bucket="masktune", Key="tenant-data/changing/list_eval_partition.txt", Body=b"000001.jpg 1\n")
    job = run_job(alpha, {"dataset_id": dataset["id"], **JOB})
    assert job["status"] == "failed" and "changed after it was validated" in job["error"]["message"], job


def test_a_tenant_cannot_name_another_tenants_upload(stack, alpha, beta):
    upload = upload_dataset(beta, zip_of({f"train/{c}/{i}.txt": b"x" for c in "ab" for i in range(2)}))
    blob_url = stack.env["MASKTUNE_BLOB_URL"]
    for url in (f"{blob_url}/datasets/{upload['id']}/upload", f"{blob_url.upper()}/datasets/{upload['id']}/upload",
                f"{blob_url}/datasets/{upload['id']}/", "s3://masktune/"):
        response = alpha.post("/v1/datasets", json={"url": url})
        assert response.status_code == 422, (url, response.text)
        assert response.json()["code"] == "dataset_url_not_allowed"
        assert "service's own storage" in response.json()["detail"]
    assert [d["id"] for d in alpha.get("/v1/datasets").json()["data"] if d["source_url"] and "service-" in d["source_url"]] == []


@pytest.mark.parametrize("url,why", [
    ("s3://beta-data/celeba/", "only under"),  # beta's prefix, not alpha's
    ("s3://masktune/tenant-data/../service/x", "'..'"),
    ("file:///etc/passwd", "s3://"),
])
def test_urls_outside_the_tenants_prefixes_are_refused(alpha, url, why):
    response = alpha.post("/v1/datasets", json={"url": url})
    assert response.status_code == 422 and response.json()["code"] == "dataset_url_not_allowed", response.text
    assert why in response.json()["detail"]


def test_bad_json_bodies(alpha):
    assert alpha.post("/v1/datasets", json={"url": "s3://masktune/x", "extra": 1}).json()["code"] == "validation_error"
    response = alpha.post("/v1/datasets", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["code"] == "validation_error"


def test_nothing_at_the_url_is_invalid(alpha):
    dataset = register(alpha, "s3://masktune/tenant-data/nothing-here/")
    assert dataset["status"] == "invalid" and "nothing found at s3://masktune/tenant-data/nothing-here" in dataset["error"]


def celeba_zip(root: Path, n: int) -> bytes:
    write_celeba(root, n=n, size=(4, 4))
    return zip_of({p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})


def test_a_key_that_is_no_safe_path_makes_the_dataset_invalid(alpha, s3):
    s3.put_object(Bucket="masktune", Key="tenant-data/evil/train/a/1.png", Body=b"x")
    s3.put_object(Bucket="masktune", Key="tenant-data/evil/train/a\\..\\..\\escape.png", Body=b"x")
    dataset = register(alpha, "s3://masktune/tenant-data/evil/")
    assert dataset["status"] == "invalid" and "not a safe relative path" in dataset["error"], dataset


def test_archive_member_cap_setting_and_a_celeba_upload(alpha, tmp_path):
    over = upload_dataset(alpha, celeba_zip(tmp_path / "over", MEMBER_CAP - 1), "celeba.zip")  # + 2 list files
    assert over["status"] == "invalid" and f"more than {MEMBER_CAP} members" in over["error"], over
    fits = upload_dataset(alpha, celeba_zip(tmp_path / "fits", MEMBER_CAP - 2), "celeba.zip")
    assert fits["status"] == "ready", fits
    assert fits["summary"]["layout"] == "celeba" and fits["summary"]["images"] == MEMBER_CAP - 2
