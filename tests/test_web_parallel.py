"""The consistent-change pages of a run: start a parallel dataset, follow it, and browse its
clusters with every member as a row of its versions, one per label."""
import re

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.cli import main as diffmine
from app.db import session_scope
from app.models import Job
from app.web import create_app
from tests.web_helpers import form_token

QUICK = ["--invert-steps", "8", "--sample-steps", "4", "--guidance", "2"]


def test_start_then_browse_a_parallel_dataset(mined_settings):
    client = TestClient(create_app(mined_settings))
    assert 'href="/runs/1/parallel"' in client.get("/runs/1").text
    page = client.get("/runs/1/parallel")
    assert "No parallel dataset yet" in page.text
    token = form_token(client, "/runs/1/parallel")
    response = client.post("/runs/1/parallel", data={"images": "3", "csrf_token": token})
    assert response.status_code == 200 and response.url.path == "/runs/1/parallel"
    with session_scope(mined_settings) as session:
        queued = session.scalars(select(Job).where(Job.kind == "parallel")).one()
        assert queued.params["images"] == 3 and queued.status == "queued"
        queued_id = queued.id
    # the list polls while a job is pending
    assert 'hx-trigger="every 2s"' in client.get("/runs/1/parallel").text

    home = str(mined_settings.home_dir)
    assert diffmine(["translate", "--run", "1", "--parallel", "3", "--clusters", "2", *QUICK,
                     "--home", home, "--json"]) == 0
    jobs = client.get("/runs/1/parallel.json").json()["jobs"]
    done = next(job for job in jobs if job["status"] == "succeeded")
    result = client.get(f"/runs/1/parallel/{done['id']}.json").json()
    labels = [label["name"] for label in result["labels"]]
    assert result["clusters"] and len(labels) == 10
    html = client.get(f"/runs/1/parallel/{done['id']}").text
    for cluster in result["clusters"]:
        for member in cluster["members"]:
            assert f'src="/files/{member["source_crop"]}"' in html
            for version in member["versions"]:
                assert f'src="/files/{version["crop"]}"' in html
    crop = re.search(r'src="(/files/runs/1/parallel/[^"]+\.png)"', html).group(1)
    assert client.get(crop).headers["content-type"] == "image/png"
    assert client.get(f"/runs/1/parallel/{queued_id}").status_code == 200  # still queued: a notice
    assert client.get("/runs/1/parallel/9999").status_code == 404


def test_a_bad_sample_size_is_refused_and_queues_nothing(mined_settings):
    client = TestClient(create_app(mined_settings))
    token = form_token(client, "/runs/1/parallel")
    for images in ("0", "-3", "many"):
        response = client.post("/runs/1/parallel", data={"images": images, "csrf_token": token})
        assert response.status_code == 400
    with session_scope(mined_settings) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.kind == "parallel")) == 0
