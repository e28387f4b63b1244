"""Datasets registered by URL: which URLs a tenant may name.

A URL is compared only in its normalised form (scheme and bucket lower-cased, no empty,
``.`` or ``..`` segments, no query, fragment, credentials or percent-escapes), segment by
segment, so ``s3://b/data`` never admits ``s3://b/data-other`` and no spelling of a key
reaches past its prefix. The service's own blob store is always refused, in both
directions: a URL inside it would name another tenant's upload, and a URL above it would
list every tenant's files (compared without regard to case, to be safe on stores that ignore it).
"""

from __future__ import annotations

import re

SCHEMES = ("s3",)  # fsspec protocols a dataset URL may use
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_FORBIDDEN = re.compile(r"[%?#\\\x00-\x1f\x7f]")


class BadDatasetUrl(ValueError):
    """The URL is malformed, or names a place it may not."""


def split_url(url: str) -> tuple[str, ...]:
    """(scheme, bucket, key segments...) of a normalised URL; BadDatasetUrl otherwise."""
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise BadDatasetUrl(f"a dataset URL starts with {' or '.join(s + '://' for s in SCHEMES)}")
    if _FORBIDDEN.search(rest):
        raise BadDatasetUrl("a dataset URL may not hold '%', '?', '#', '\\' or control characters")
    bucket, *segments = rest.split("/")
    bucket = bucket.lower()
    if not _BUCKET.fullmatch(bucket):
        raise BadDatasetUrl(f"{bucket!r} is not a bucket name")
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash: the same prefix
    if any(s in ("", ".", "..") for s in segments):
        raise BadDatasetUrl("a dataset URL may not hold empty, '.' or '..' path segments")
    return (scheme, bucket, *segments)


def normalize_url(url: str) -> str:
    scheme, bucket, *segments = split_url(url)
    return f"{scheme}://{'/'.join([bucket, *segments])}"


def _within(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    return inner[: len(outer)] == outer


def _store_parts(blob_url: str) -> tuple[str, ...] | None:
    """The blob store as URL parts, or None when it is not on a dataset URL scheme (a local folder)."""
    try:
        return split_url(blob_url)
    except BadDatasetUrl:
        return None


def check_dataset_url(url: str, *, tenant: str, prefixes: dict[str, list[str]], blob_url: str) -> str:
    """The normalised URL if ``tenant`` (its name) may register it, else BadDatasetUrl saying why."""
    parts = split_url(url)
    if inside_blob_store(url, blob_url):
        raise BadDatasetUrl("the URL points into the service's own storage; name your own bucket or prefix")
    allowed = prefixes.get(tenant, []) + prefixes.get("*", [])
    if not any(_within(parts, split_url(prefix)) for prefix in allowed):
        raise BadDatasetUrl(f"datasets by URL are allowed for this tenant only under {allowed}" if allowed
                            else "this tenant may not register datasets by URL (no prefix is allowed)")
    return normalize_url(url)


def inside_blob_store(url: str, blob_url: str) -> bool:
    """True if ``url`` and the blob store overlap (the worker checks again before it reads).

    Compared case-insensitively: S3 keys are case-sensitive, but some compatible stores are not."""
    store = _store_parts(blob_url)
    if store is None:
        return False
    parts, store = tuple(p.casefold() for p in split_url(url)), tuple(p.casefold() for p in store)
    return _within(parts, store) or _within(store, parts)
