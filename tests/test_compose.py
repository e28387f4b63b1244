"""No Docker engine runs here: check the compose file and Dockerfile as text."""

import re
from pathlib import Path

import yaml

from jobstore.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags: ``!reset`` drops what the file it overrides set."""


RESET = object()
_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


def test_services_ports_and_health_checks():
    services = compose()["services"]
    assert set(services) == {"migrate", "api", "worker", "beat", "redis", "postgres"}
    for name, service in services.items():
        if name != "migrate":  # one-shot: it exits, and the others wait for its success
            assert "test" in service["healthcheck"], name
    assert "8000:8000" in services["api"]["ports"]
    for name in ("api", "worker", "beat"):
        for dependency in ("redis", "postgres"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"


def test_images_and_gpu_reservation():
    services = compose()["services"]
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    # api and worker share the blob volume (one host; S3-compatible storage for several).
    assert any(v.startswith("blobs:") for v in services["api"]["volumes"])
    assert any(v.startswith("blobs:") for v in services["worker"]["volumes"])


def test_one_job_worker_per_gpu_that_refuses_to_run_without_it():
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["device_ids"] == ["0"]
    assert "count" not in device  # device_ids pins the GPU; a count would let two workers share one
    assert worker["environment"]["MASKTUNE_DEVICE"] == "cuda"
    command = worker["command"]
    assert command[command.index("-Q") + 1] == "masktune.jobs"  # jobs only: validation is the beat's
    name = command[command.index("-n") + 1].split("@")[0]
    assert f"-d {name}@" in worker["healthcheck"]["test"][1]  # the health check pings this worker


def test_the_cpu_override_runs_the_same_worker_on_the_cpu():
    base, override = compose()["services"], compose("compose.cpu.yaml")["services"]
    assert set(override) == {"worker"} <= set(base)
    assert override["worker"]["deploy"] is RESET  # no GPU reservation left to fail on a host without one
    merged = {**base["worker"]["environment"], **override["worker"]["environment"]}
    assert Settings(**{k[len("MASKTUNE_"):].lower(): v for k, v in merged.items() if k.startswith("MASKTUNE_")}).device == "cpu"
    assert "compose.cpu.yaml" in (ROOT / "docker-compose.yml").read_text()  # the base file says how to use it
    assert "# COMPOSE_FILE=docker-compose.yml:compose.cpu.yaml" in (ROOT / ".env.example").read_text()


def test_environment_names_real_settings_that_point_at_the_compose_services():
    services = compose()["services"]
    known = {f"MASKTUNE_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "beat"):
        env = services[name]["environment"]
        masktune = {k for k in env if k.startswith("MASKTUNE_")}
        assert masktune <= known, masktune - known
        settings = Settings(**{k[len("MASKTUNE_"):].lower(): v for k, v in env.items()})
        assert "@postgres:5432/" in settings.database_url and settings.broker_url == "redis://redis:6379/0"
        assert settings.visibility_timeout_s >= 3600
    pg = services["postgres"]["environment"]
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}" in services["api"]["environment"]["MASKTUNE_DATABASE_URL"]


def test_api_image_has_no_torch():
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)
    api = next(s for s in stages if s.split()[2:3] == ["api"])
    worker = next(s for s in stages if s.split()[2:3] == ["worker"])
    assert "masktune_core" not in api and "[ml" not in api and "torch" not in api.lower().replace("# ", "")
    assert "[ml" in worker and "worker.celery_app" in worker


def test_exactly_one_beat_sends_the_reconciler():
    services = compose()["services"]
    with_beat = [name for name, s in services.items() if "-B" in s.get("command", []) or "beat" in s.get("command", [])[3:4]]
    assert with_beat == ["beat"]
    beat = services["beat"]
    assert beat["deploy"]["replicas"] == 1 and "devices" not in str(beat["deploy"])
    assert "masktune.validation" in beat["command"]  # the queue the reconciler is routed to
    assert any(v.startswith("blobs:") for v in beat["volumes"])  # it expires work areas in blob storage


def test_api_runs_several_processes_as_documented():
    services = compose()["services"]
    api = services["api"]
    assert api["command"] == ["python", "-m", "api"]  # uvicorn with MASKTUNE_API_WORKERS
    env = api["environment"]
    settings = Settings(**{k[len("MASKTUNE_"):].lower(): v for k, v in env.items()})
    assert settings.api_workers >= 2 and settings.api_host == "0.0.0.0"
    assert f"{settings.api_port}:{settings.api_port}" in api["ports"]
    for name in ("worker", "beat"):  # the API's settings stay the API's
        assert not {k for k in services[name]["environment"] if k.startswith("MASKTUNE_API_")}
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)
    image = next(s for s in stages if s.split()[2:3] == ["api"])
    assert 'CMD ["python", "-m", "api"]' in image and "MASKTUNE_API_HOST=0.0.0.0" in image


def test_migrations_and_the_first_key_come_from_a_one_shot_service_before_the_rest():
    services = compose()["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["python", "-m", "api.manage", "migrate", "--bootstrap-key"]
    assert migrate["restart"] == "no" and migrate["build"]["target"] == "api"  # the small image, run once
    assert migrate["environment"]["MASKTUNE_BOOTSTRAP_API_KEY"] == "${MASKTUNE_BOOTSTRAP_API_KEY:-}"  # from .env
    assert migrate["environment"]["MASKTUNE_DATABASE_URL"] == services["api"]["environment"]["MASKTUNE_DATABASE_URL"]
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    api_env = services["api"]["environment"]
    assert Settings(migrate_on_start=api_env["MASKTUNE_MIGRATE_ON_START"]).migrate_on_start is False  # no API process migrates
    for name, service in services.items():
        if name != "migrate":
            assert service["restart"] == "unless-stopped", name
    env_example = (ROOT / ".env.example").read_text()
    assert "# MASKTUNE_BOOTSTRAP_API_KEY=" in env_example
    known = {f"MASKTUNE_{name.upper()}" for name in Settings.model_fields}
    assert {k for k in migrate["environment"] if k.startswith("MASKTUNE_")} <= known
