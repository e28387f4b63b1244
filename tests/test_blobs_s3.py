"""Blob storage on an S3-compatible server (moto in server mode, real HTTP), as a deployment with
MASKTUNE_BLOB_URL=s3://bucket/prefix uses it. The endpoint comes from fsspec's environment config."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import boto3
import pytest

from jobstore.blobs import BlobStore, TooLarge
from stack import free_port


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                             aws_secret_access_key="test").create_bucket(Bucket="masktune")
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None, "moto server did not start"
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def store(s3_endpoint, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "FSSPEC_S3_ENDPOINT_URL": s3_endpoint, "FSSPEC_S3_SKIP_INSTANCE_CACHE": "true"}.items():
        monkeypatch.setenv(name, value)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # the endpoint, as a deployment's environment gives it
    return BlobStore(f"s3://masktune/run-{time.time_ns()}")


def test_write_read_list_delete_over_s3(store, tmp_path):
    payload = b"weights" * 100_000
    size, sha256 = store.write_stream("jobs/job_1/artifacts/model.safetensors", iter([payload[:1000], payload[1000:]]))
    assert (size, sha256) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert store.exists("jobs/job_1/artifacts/model.safetensors")
    assert store.size("jobs/job_1/artifacts/model.safetensors") == len(payload)
    with store.open("jobs/job_1/artifacts/model.safetensors") as fh:
        assert fh.read() == payload
    store.get_file("jobs/job_1/artifacts/model.safetensors", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == payload
    store.put_file("jobs/job_1/work/state.json", tmp_path / "copy")
    assert store.list("jobs/job_1") == ["jobs/job_1/artifacts/model.safetensors", "jobs/job_1/work/state.json"]
    store.delete_prefix("jobs/job_1/work")
    assert store.list("jobs/job_1") == ["jobs/job_1/artifacts/model.safetensors"]
    store.check()


def test_a_refused_stream_leaves_nothing_over_s3(store):
    with pytest.raises(TooLarge):
        store.write_stream("datasets/ds_1/upload", iter([b"x" * 600, b"x" * 600]), max_bytes=1000)
    assert store.list("datasets") == []
