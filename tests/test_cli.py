"""The command line as a user runs it: a real subprocess, real files."""
import json
import subprocess
import sys

from tests.conftest import label_files, snapshot, write_zip


def diffmine(*args, home):
    return subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=300)


def test_ingest_and_list_with_json(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    done = diffmine("ingest", str(archive), "--name", "pets", "--json", home=settings.home_dir)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dataset"] == "pets" and result["images"] == 11 and result["duplicates"] == 0
    assert result["label_sets"] == {"label": {"cat": 6, "dog": 5}}

    listed = json.loads(diffmine("datasets", "--json", home=settings.home_dir).stdout)
    assert [d["name"] for d in listed["datasets"]] == ["pets"]
    assert listed["datasets"][0]["label_sets"][0]["labels"][0] == {
        "id": 1, "name": "cat", "images": 6}


def test_human_summary(settings, tmp_path):
    archive = write_zip(tmp_path / "pets.zip", label_files({"cat": 6, "dog": 5}))
    done = diffmine("ingest", str(archive), "--name", "pets", home=settings.home_dir)
    assert "Ingested 11 images into dataset 'pets'" in done.stdout
    assert "label: cat (6), dog (5)" in done.stdout


def test_failure_is_one_line_and_writes_nothing(settings, tmp_path):
    files = label_files({"cat": 6, "dog": 5})
    files["dog/readme.txt"] = b"not an image"
    before = snapshot(settings)
    done = diffmine("ingest", str(write_zip(tmp_path / "bad.zip", files)), "--name", "bad",
                    "--json", home=settings.home_dir)
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
