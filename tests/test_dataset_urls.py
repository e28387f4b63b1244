"""jobstore.dataset_urls: which dataset URLs a tenant may name."""

from __future__ import annotations

import pytest

from jobstore.dataset_urls import BadDatasetUrl, check_dataset_url, normalize_url
from jobstore.settings import Settings

PREFIXES = {"acme": ["s3://acme-data/datasets/"], "*": ["s3://public-data/"], "other": ["s3://other-data/"]}
STORE = "s3://service-blobs/masktune"


def check(url: str, tenant: str = "acme", blob_url: str = STORE) -> str:
    return check_dataset_url(url, tenant=tenant, prefixes=PREFIXES, blob_url=blob_url)


@pytest.mark.parametrize("url,expected", [
    ("s3://acme-data/datasets/celeba/", "s3://acme-data/datasets/celeba"),
    ("S3://ACME-DATA/datasets/celeba.zip", "s3://acme-data/datasets/celeba.zip"),
    ("  s3://acme-data/datasets  ", "s3://acme-data/datasets"),
    ("s3://public-data/waterbirds", "s3://public-data/waterbirds"),
])
def test_allowed_urls_come_back_normalised(url, expected):
    assert check(url) == expected


@pytest.mark.parametrize("url,why", [
    ("s3://acme-data/datasets-other/x", "only under"),  # a prefix is whole segments, not a string prefix
    ("s3://acme-data/datasets/../private/x", "'..'"),
    ("s3://acme-data/datasets//x", "empty"),
    ("s3://acme-data/datasets/./x", "'.'"),
    ("s3://acme-data/datasets/%2e%2e/x", "'%'"),
    ("s3://acme-data/datasets/x?versionId=1", "'?'"),
    ("s3://user:pw@acme-data/datasets/x", "bucket"),
    ("file:///etc/passwd", "s3://"),
    ("s3a://acme-data/datasets/x", "s3://"),
    ("s3://other-data/x", "only under"),  # another tenant's prefix
])
def test_refused_urls_say_why(url, why):
    with pytest.raises(BadDatasetUrl, match=why.replace("?", r"\?").replace(".", r"\.")):
        check(url)


@pytest.mark.parametrize("url", [
    "s3://service-blobs/masktune/datasets/ds_0123/upload",  # another tenant's upload
    "s3://SERVICE-BLOBS/masktune/jobs/",
    "s3://service-blobs/MaskTune/datasets/",  # S3 keys are case-sensitive, some compatible stores are not
    "s3://service-blobs/masktune",
    "s3://service-blobs/",  # a prefix above the store would list every tenant's files
])
def test_the_service_blob_store_is_refused_even_when_a_prefix_allows_it(url):
    prefixes = {"*": ["s3://service-blobs/"]}
    with pytest.raises(BadDatasetUrl, match="service's own storage"):
        check_dataset_url(url, tenant="acme", prefixes=prefixes, blob_url=STORE)
    assert check_dataset_url("s3://service-blobs/elsewhere/x", tenant="acme", prefixes=prefixes, blob_url=STORE)


def test_no_prefix_no_urls():
    with pytest.raises(BadDatasetUrl, match="may not register"):
        check_dataset_url("s3://acme-data/datasets/x", tenant="acme", prefixes={}, blob_url="/var/blobs")


def test_prefix_setting_is_json_and_normalised(monkeypatch):
    monkeypatch.setenv("MASKTUNE_DATASET_URL_PREFIXES", '{"acme": ["S3://Acme-Data/datasets"]}')
    assert Settings().dataset_url_prefixes == {"acme": ["s3://acme-data/datasets/"]}
    monkeypatch.setenv("MASKTUNE_DATASET_URL_PREFIXES", '{"acme": ["s3://acme-data/../x"]}')
    with pytest.raises(ValueError, match="'..'"):
        Settings()
    assert normalize_url("s3://a-b/c/") == "s3://a-b/c"
