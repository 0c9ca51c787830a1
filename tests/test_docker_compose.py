"""docker-compose.yml cannot run here (no Docker engine): check it against the CLI instead."""
from pathlib import Path

import yaml

from app.cli import COMMANDS, build_parser
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_run_real_commands_on_one_volume():
    services = compose()["services"]
    assert set(services) == {"web", "worker"}
    assert services["web"]["command"] == ["diffmine", "serve"]
    assert services["worker"]["command"] == ["diffmine", "worker"]
    for service in services.values():
        command = service["command"][1]
        assert command in COMMANDS
        build_parser().parse_args([command])  # the command line parses
        assert service["volumes"] == ["diffmine-data:/data"]
        assert service["environment"]["DIFFMINE_HOME"] == "/data"
    assert "diffmine-data" in compose()["volumes"]


def test_worker_reserves_an_nvidia_gpu_and_web_publishes_on_loopback():
    services = compose()["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker"]["environment"]["DIFFMINE_DEVICE"] == "cuda"
    assert services["web"]["ports"] == ["127.0.0.1:8000:8000"]


def test_environment_names_are_real_settings():
    fields = {f"DIFFMINE_{name.upper()}" for name in Settings.model_fields}
    for service in compose()["services"].values():
        assert set(service["environment"]) <= fields


def test_dockerfile_copies_what_the_app_needs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("app", "worker", "templates", "static", "migrations", "demo"):
        assert f"COPY {folder} {folder}" in dockerfile
