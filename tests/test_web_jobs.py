"""Job pages: stage, done/total, rate, ETA and log tail, polled while the job is active and
still there after a reload; cancel."""

from app.db import session_scope
from app.jobs import enqueue
from app.models import Job
from tests.web_helpers import form_token


def running_job(settings) -> int:
    with session_scope(settings) as session:
        job = enqueue(session, kind="pipeline", params={"run_id": 1, "model_id": 1})
        job.status, job.stage = "running", "score"
        job.progress_done, job.progress_total, job.rate, job.eta_seconds = 30, 120, 2.5, 36
        job.message, job.log = "typicality", "line one\nline two <b>"
        return job.id


def test_job_page_shows_progress_and_polls_while_active(mined_settings, client):
    job_id = running_job(mined_settings)
    html = client.get(f"/jobs/{job_id}").text
    assert f'hx-get="/jobs/{job_id}/progress"' in html and 'hx-trigger="every 1s"' in html
    for text in ("score", "30 / 120", "25.0%", "2.5/s", "ETA 36s", "line two &lt;b&gt;", "Cancel job"):
        assert text in html, text
    fragment = client.get(f"/jobs/{job_id}/progress")
    assert "<html" not in fragment.text and "30 / 120" in fragment.text
    data = client.get(f"/jobs/{job_id}.json").json()
    assert data["stage"] == "score" and data["fraction"] == 0.25 and data["eta_seconds"] == 36
    assert data["log"] == ["line one", "line two <b>"] and data["active"]


def test_finished_job_stops_polling_and_links_to_its_results(client):
    html = client.get("/jobs/3").text  # the fixture's mine job
    assert "hx-trigger" not in html and 'href="/runs/1"' in html and "Cancel job" not in html


def test_cancel(mined_settings, client):
    with session_scope(mined_settings) as session:
        # Not the running job's kind and params: an identical job would be that job again.
        queued = enqueue(session, kind="score", params={"run_id": 1, "model_id": 1}).id
    running = running_job(mined_settings)
    token = form_token(client, f"/jobs/{queued}")
    response = client.post(f"/jobs/{queued}/cancel", data={"csrf_token": token})
    assert response.url.path == f"/jobs/{queued}" and "cancelled" in response.text
    fragment = client.post(f"/jobs/{running}/cancel", headers={"HX-Request": "true",
                                                               "X-CSRF-Token": token})
    assert "stopping at the next step" in fragment.text
    with session_scope(mined_settings) as session:
        assert session.get(Job, queued).status == "cancelled"
        assert session.get(Job, running).cancel_requested
    assert client.post("/jobs/999/cancel", data={"csrf_token": token}).status_code == 404


def test_jobs_list(client):
    data = client.get("/jobs.json").json()
    assert [j["kind"] for j in data["jobs"]][-3:] == ["mine", "score", "train"]
    assert client.get("/jobs").status_code == 200
