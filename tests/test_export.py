"""`diffmine export`: the documented JSON layout, CSV rows, a self-contained HTML report."""
import csv
import io
import json

from tests.cli_helpers import run_diffmine


def export(settings, *args):
    done = run_diffmine(settings.home_dir, "export", "1", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_json_layout(mined_settings):
    data = json.loads(export(mined_settings, "--format", "json"))
    assert set(data) == {"run", "labels", "images"}
    assert data["run"]["id"] == 1 and data["run"]["preset"] == "fast"
    assert [label["name"] for label in data["labels"]][:3] == ["Bear", "Bird", "Cat"]
    cluster = data["labels"][0]["clusters"][0]
    assert cluster["rank"] == 0 and isinstance(cluster["median_typicality"], float)
    member = cluster["members"][0]
    assert set(member) == {"image", "box", "typicality", "typicality_stderr", "stay"}
    assert member["image"].startswith("bear/") and len(member["box"]) == 4
    assert len(data["images"]) == 120
    image = data["images"][0]
    assert set(image) == {"image", "split", "scores"} and len(image["scores"]) == 10


def test_csv_has_one_row_per_member(mined_settings):
    rows = list(csv.DictReader(io.StringIO(export(mined_settings, "--format", "csv"))))
    data = json.loads(export(mined_settings, "--format", "json"))
    assert len(rows) == sum(len(c["members"]) for label in data["labels"] for c in label["clusters"])
    assert rows[0]["label"] == "Bear" and rows[0]["cluster_rank"] == "0"


def test_html_report_is_self_contained(mined_settings, tmp_path):
    target = tmp_path / "report.html"
    export(mined_settings, "--format", "html", "-o", str(target))
    page = target.read_text()
    assert page.count("data:image/png;base64,") >= 10
    assert "src='/" not in page and 'src="/' not in page and "http" not in page.split("<footer>")[0]


def test_unknown_run_fails_and_writes_nothing(mined_settings, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = run_diffmine(mined_settings.home_dir, "export", "99", "-o", str(out / "x.json"))
    assert done.returncode == 1 and done.stderr.strip() == "diffmine export: no run 99"
    assert list(out.iterdir()) == []
