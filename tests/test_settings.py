"""Every setting is declared once (app/settings.py): an environment variable and a CLI flag."""
from pathlib import Path

import pytest

from app.cli import build_parser, settings_environment, settings_from
from app.settings import Settings


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No DIFFMINE_ variable from the shell running the tests, and a known working directory."""
    import os

    for name in [n for n in os.environ if n.startswith("DIFFMINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults(clean_environment, tmp_path):
    settings = Settings()
    assert settings.home == Path("diffmine-data")
    assert settings.home_dir == tmp_path.resolve() / "diffmine-data"
    assert (settings.host, settings.port, settings.device, settings.token) == (
        "127.0.0.1", 8000, "auto", None)
    assert settings.database_url is None
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'diffmine-data' / 'diffmine.sqlite'}"


def test_environment_variables(clean_environment, tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    clean_environment.setenv("DIFFMINE_DATABASE_URL", url)
    clean_environment.setenv("DIFFMINE_DEVICE", "cpu")
    clean_environment.setenv("DIFFMINE_TOKEN", "secret-of-16-chars")
    settings = Settings()
    assert settings.db_url == url
    assert (settings.device, settings.token) == ("cpu", "secret-of-16-chars")


def test_flags_override_the_environment(clean_environment, tmp_path):
    clean_environment.setenv("DIFFMINE_DEVICE", "cuda")
    args = build_parser().parse_args([
        "datasets", "--home", str(tmp_path / "h"), "--database-url", "sqlite:///x.sqlite",
        "--device", "cpu", "--token", "t0ken-of-16-chars"])
    settings = settings_from(args)
    assert settings.home_dir == tmp_path / "h"
    assert (settings.database_url, settings.device, settings.token) == (
        "sqlite:///x.sqlite", "cpu", "t0ken-of-16-chars")


def test_unset_flags_keep_the_environment(clean_environment):
    clean_environment.setenv("DIFFMINE_DEVICE", "cuda:1")
    settings = settings_from(build_parser().parse_args(["datasets"]))
    assert settings.device == "cuda:1"


def test_child_processes_get_the_flagged_settings(clean_environment, tmp_path):
    settings = Settings(home=tmp_path, database_url="sqlite:///x.sqlite", device="cpu")
    assert settings_environment(settings) == {
        "DIFFMINE_HOME": str(tmp_path), "DIFFMINE_HOST": "127.0.0.1", "DIFFMINE_PORT": "8000",
        "DIFFMINE_DATABASE_URL": "sqlite:///x.sqlite", "DIFFMINE_DEVICE": "cpu"}


def test_an_empty_token_is_no_token(clean_environment):
    clean_environment.setenv("DIFFMINE_TOKEN", "")
    assert Settings().token is None
