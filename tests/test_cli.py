"""The command line as a user runs it: a real subprocess, real files."""
import json
import subprocess
import sys

from tests.cli_helpers import run_diffmine
from tests.conftest import label_files, snapshot, write_zip


def test_ingest_and_list_with_json(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    done = run_diffmine(settings.home_dir, "ingest", str(archive), "--name", "pets", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dataset"] == "pets" and result["images"] == 11 and result["duplicates"] == 0
    assert result["label_sets"] == {"label": {"cat": 6, "dog": 5}}

    listed = json.loads(run_diffmine(settings.home_dir, "datasets", "--json").stdout)
    assert [d["name"] for d in listed["datasets"]] == ["pets"]
    assert listed["datasets"][0]["label_sets"][0]["labels"][0] == {
        "id": 1, "name": "cat", "images": 6}


def test_human_summary(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    done = run_diffmine(settings.home_dir, "ingest", str(archive), "--name", "pets")
    assert "Ingested 11 images into dataset 'pets'" in done.stdout
    assert "label: cat (6), dog (5)" in done.stdout


def test_failure_is_one_line_and_writes_nothing(settings, tmp_path):
    files = label_files({"cat": 6, "dog": 5})
    files["dog/readme.txt"] = b"not an image"
    before = snapshot(settings)
    done = run_diffmine(settings.home_dir, "ingest", str(write_zip(tmp_path / "bad.zip", files)), "--name", "bad",
                        "--json")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "diffmine ingest: dog/readme.txt: not an image file (Pillow cannot identify it)")
    assert snapshot(settings) == before


def test_home_from_environment(tmp_path):
    import os

    env = dict(os.environ, DIFFMINE_HOME=str(tmp_path / "envhome"))
    done = subprocess.run([sys.executable, "-m", "app.cli", "datasets", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["datasets"] == []
    assert (tmp_path / "envhome" / "diffmine.sqlite").exists()


def test_setting_flags_before_the_command(tmp_path):
    """`diffmine --home X --json datasets`: flags before the command count as after it (a
    subcommand's own default used to overwrite them, so the data went to ./diffmine-data)."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "--home", str(tmp_path / "before"), "--json",
                           "datasets"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["datasets"] == []
    assert (tmp_path / "before" / "diffmine.sqlite").exists()
    assert not (tmp_path / "diffmine-data").exists()


def test_ingest_names_the_dataset_after_its_zip(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    done = run_diffmine(settings.home_dir, "ingest", str(archive), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dataset"] == "pets"


NOT_AN_IMAGE = "diffmine ingest: dog/readme.txt: not an image file (Pillow cannot identify it)"


def bad_zip(tmp_path):
    files = label_files({"cat": 6, "dog": 5})
    files["dog/readme.txt"] = b"not an image"
    return write_zip(tmp_path / "bad.zip", files)


def test_failed_ingest_into_a_new_folder_leaves_no_folder(tmp_path):
    home = tmp_path / "new-home"
    done = run_diffmine(home, "ingest", str(bad_zip(tmp_path)), "--json")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [NOT_AN_IMAGE]
    assert not home.exists()


def test_failed_ingest_into_an_empty_folder_leaves_it_empty(tmp_path):
    home = tmp_path / "empty-home"
    home.mkdir()
    done = run_diffmine(home, "ingest", str(bad_zip(tmp_path)))
    assert done.returncode == 1
    # Without --json a progress bar was drawn: the error still has a line of its own.
    assert done.stderr.splitlines()[-1] == NOT_AN_IMAGE
    assert list(home.iterdir()) == []  # no database, no staging/ folder


def test_successful_ingest_leaves_no_staging_folder(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    assert run_diffmine(settings.home_dir, "ingest", str(archive)).returncode == 0
    assert not settings.staging_dir.exists()


def test_database_url_flag(tmp_path):
    home, database = tmp_path / "home", tmp_path / "other.sqlite"
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    url = f"sqlite:///{database}"
    done = run_diffmine(home, "ingest", str(archive), "--database-url", url, "--json")
    assert done.returncode == 0, done.stderr
    assert database.exists() and not (home / "diffmine.sqlite").exists()

    listed = run_diffmine(home, "datasets", "--database-url", url, "--json")
    assert [d["name"] for d in json.loads(listed.stdout)["datasets"]] == ["pets"]
    in_home = run_diffmine(home, "datasets", "--json")
    assert json.loads(in_home.stdout)["datasets"] == []
