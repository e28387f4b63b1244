"""The compose files, Dockerfile and constraints as shipped, read as Compose would read them.

scripts/compose-check.sh starts the stack for real (Docker is not in every CI); these tests hold the rules that
make it start and be configurable: plain `docker compose up` needs no GPU, .env reaches every service, the
settings load from exactly the environment Compose hands each container (empty values included).
"""

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from jobstore.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
OURS = ("migrate", "api", "worker", "beat")  # the services that run this project's code
_DEFAULTED = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def interpolated(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with ``env`` as the shell's environment (and .env)."""
    return _DEFAULTED.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def container_env(service: dict, shell: dict[str, str], dotenv: dict[str, str]) -> dict[str, str]:
    """What the container's process sees: env_file first, `environment` over it (Compose's precedence)."""
    env = dict(dotenv) if service.get("env_file") else {}
    env.update({k: interpolated(str(v), {**dotenv, **shell}) for k, v in service["environment"].items()})
    return env


def settings_in(env: dict[str, str], monkeypatch) -> Settings:
    for name in [k for k in os.environ if k.startswith("MASKTUNE_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


def test_plain_up_needs_no_gpu_and_the_gpu_file_gives_one_worker_per_gpu():
    base = compose()["services"]
    assert set(base) == {"migrate", "api", "worker", "beat", "redis", "postgres"}
    assert "devices" not in str(base), "plain `docker compose up` must start on a host without a GPU"
    assert "MASKTUNE_DEVICE" not in base["worker"]["environment"]  # auto: CUDA when the container sees one
    gpu = compose("compose.gpu.yaml")["services"]
    for name, gpu_id in (("worker", "0"), ("worker-gpu1", "1")):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["device_ids"] == [gpu_id] and "count" not in device
        command = gpu[name]["command"]
        worker_name = command[command.index("-n") + 1].split("@")[0]
        assert f"-d {worker_name}@" in gpu[name]["healthcheck"]["test"][1]  # the health check pings this one
        assert command[command.index("-Q") + 1] == "masktune.jobs" and command[command.index("--concurrency") + 1] == "1"
    assert gpu["worker"]["environment"]["MASKTUNE_DEVICE"] == "cuda"  # no silent CPU fall-back on a GPU host
    assert gpu["worker"]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # PyPI's torch is CUDA's


def test_every_service_of_ours_reads_an_optional_env_file():
    services = compose()["services"]
    for name in OURS:
        assert services[name]["env_file"] == [{"path": ".env", "required": False}], name


@pytest.mark.parametrize("dotenv", [{}, {"MASKTUNE_BOOTSTRAP_API_KEY": "", "MASKTUNE_WORKER_METRICS_PORT": ""},
                                    {"MASKTUNE_BLOB_URL": "s3://bucket/blobs", "MASKTUNE_LOG_FORMAT": "text"}])
def test_settings_load_from_what_compose_hands_each_container(dotenv, monkeypatch):
    """A blank line in .env (`MASKTUNE_BOOTSTRAP_API_KEY=`, as .env.example suggests) or an unset variable behind
    `${X:-}` reaches the container as an empty string: the settings must take it as unset, not refuse to start."""
    services = compose()["services"]
    for name in OURS:
        env = container_env(services[name], shell={}, dotenv=dotenv)
        settings = settings_in(env, monkeypatch)
        assert settings.bootstrap_api_key is None, name
        assert "@postgres:5432/" in settings.database_url and settings.broker_url == "redis://redis:6379/0", name
        assert settings.visibility_timeout_s >= 3600
        assert settings.blob_url == dotenv.get("MASKTUNE_BLOB_URL", "/data/blobs"), name  # .env's choice reaches it
    pg = services["postgres"]["environment"]
    password = interpolated(pg["POSTGRES_PASSWORD"], dotenv)
    assert f"{pg['POSTGRES_USER']}:{password}@postgres:5432/{pg['POSTGRES_DB']}" in container_env(
        services["api"], {}, dotenv)["MASKTUNE_DATABASE_URL"]


def test_migrations_once_then_the_rest_and_graceful_stops():
    services = compose()["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["python", "-m", "api.manage", "migrate", "--bootstrap-key"]
    assert migrate["restart"] == "no" and migrate["build"]["target"] == "api"  # the small image, run once
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        for dependency in ("redis", "postgres"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"
        assert services[name]["restart"] == "unless-stopped"
        assert "test" in services[name]["healthcheck"], name
    assert services["api"]["environment"]["MASKTUNE_MIGRATE_ON_START"] == "false"  # no API process migrates
    assert "/readyz" in str(services["api"]["healthcheck"]["test"])
    grace = {name: services[name]["stop_grace_period"] for name in ("worker", "beat")}
    seconds = {name: int(v[:-1]) * (60 if v.endswith("m") else 1) for name, v in grace.items()}
    assert seconds["worker"] >= 60  # a running job stops at a batch and hands itself back within it


def test_exactly_one_beat_sends_the_reconciler():
    services = compose()["services"]
    with_beat = [name for name, s in services.items() if "-B" in s.get("command", [])]
    assert with_beat == ["beat"]
    assert "masktune.validation" in services["beat"]["command"]  # the queue the reconciler is routed to


def _stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return {chunk.split()[2]: chunk for chunk in re.split(r"^FROM ", text, flags=re.M)[1:] if " AS " in chunk}


def test_dockerfile_installs_dependencies_before_the_source_and_runs_unprivileged():
    stages = _stages()
    for image in ("api", "worker"):
        body = stages[image]
        install, source = body.index("pip install"), body.index("COPY --from=")
        assert install < source, f"{image}: a code change would reinstall every dependency"
        assert "-c /build/constraints.txt" in body, f"{image}: versions not pinned"
        assert re.search(r"^USER masktune$", body, re.M), f"{image} runs as root"
    assert "COPY pyproject.toml constraints.txt docker/requirements.py" in stages["runtime"]  # no source before deps
    assert "masktune_core" not in stages["api"] + stages["api-source"] and "torch" not in stages["api"]
    assert "ARG TORCH_PACKAGES" in stages["worker"] and "ARG TORCH_INDEX_URL" in stages["worker"]


def test_constraints_pin_every_dependency_the_images_and_bootstrap_install():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0]).lower()
        if name not in {"masktune-service", "torch", "torchvision"}:  # torch's build is the Dockerfile's argument
            assert name in pins, f"{name} is not pinned in constraints.txt"
    assert "-c constraints.txt" in (ROOT / "scripts" / "bootstrap.sh").read_text()  # CI installs the same versions


def test_env_example_names_real_settings():
    known = {f"MASKTUNE_{name.upper()}" for name in Settings.model_fields}
    compose_vars = set(re.findall(r"\$\{(MASKTUNE_\w+)", (ROOT / "docker-compose.yml").read_text()))
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"#?\s*(MASKTUNE_\w+)=", line)
        if match:
            assert match.group(1) in known | compose_vars, match.group(1)
