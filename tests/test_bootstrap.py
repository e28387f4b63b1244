"""Compose's start, for real minus Docker: the one-shot migrate service's command on a fresh
PostgreSQL database, then the API with MASKTUNE_MIGRATE_ON_START=false, as compose runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stack import ROOT, Stack


def migrate(stack: Stack, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.manage", "migrate", "--bootstrap-key"], cwd=ROOT,
                          env={**stack.env, **env}, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fresh(tmp_path):
    stack = Stack(tmp_path, MASKTUNE_MIGRATE_ON_START="false")
    yield stack
    stack.close()


def test_the_api_refuses_a_database_nobody_migrated(fresh):
    with pytest.raises(RuntimeError) as failed:
        fresh.start_api()
    assert "python -m api.manage migrate" in str(failed.value)  # the log says what to run


def test_migrate_creates_the_first_key_once_and_the_api_accepts_it(fresh):
    first = migrate(fresh)
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout.strip().splitlines()[-1])["bootstrap_key"]
    assert created["tenant"] == "default" and created["secret"].startswith("mt_")
    assert created["secret"] in first.stdout.splitlines()[0]  # the log line an operator reads

    again = migrate(fresh)  # a restart of the stack: no second key, no secret in the logs
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == {"migrated": True, "bootstrap_key": None}
    assert created["secret"] not in again.stdout

    fresh.start_api()
    with fresh.client(created["secret"]) as client:
        assert client.get("/v1/jobs").status_code == 200
    with fresh.client("mt_" + "x" * 40) as stranger:
        assert stranger.get("/v1/jobs").status_code == 401


def test_a_given_bootstrap_key_is_used_and_not_echoed(fresh):
    chosen = "mt_operator-chosen-secret-0123456789"
    out = migrate(fresh, MASKTUNE_BOOTSTRAP_API_KEY=chosen, MASKTUNE_BOOTSTRAP_TENANT="platform")
    assert out.returncode == 0, out.stderr
    assert chosen not in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1])["bootstrap_key"]["tenant"] == "platform"
    fresh.start_api()
    with fresh.client(chosen) as client:
        assert client.get("/v1/datasets").status_code == 200
    short = migrate(fresh, MASKTUNE_BOOTSTRAP_API_KEY="too-short")
    assert short.returncode != 0 and "bootstrap_api_key" in short.stderr  # refused, not silently weak
