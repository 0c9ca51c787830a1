"""Starting a run from the dataset page: the form queues one pipeline job with the chosen
preset, backend, steps, draws and mining settings; bad values are explained inline."""
import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.models import Job, MiningRun, TrainedModel
from app.web import create_app
from tests.web_helpers import form_token


def test_the_form_queues_a_pipeline_job(mined_settings, client):
    page = client.get("/datasets/1")
    assert 'action="/datasets/1/runs"' in page.text and "Run 1" in page.text
    assert 'name="patch_size"' in page.text
    token = form_token(client, "/datasets/1")
    response = client.post("/datasets/1/runs", data={
        "csrf_token": token, "preset": "fast", "backend": "pixel", "steps": "20", "draws": "4",
        "size": "tiny", "per_label": "20", "clusters": "3", "all_labels": "1", "precision": "fp16",
        "processes": "2", "batch_size": "8", "image_size": "48", "tile_stride": "full",
        "support_share": "0", "patch_size": "10"})
    assert response.status_code == 200 and response.url.path == "/jobs/4"
    with session_scope(mined_settings) as session:
        job = session.get(Job, 4)
        assert job.kind == "pipeline" and job.status == "queued"
        model = session.get(TrainedModel, job.params["model_id"])
        run = session.get(MiningRun, job.params["run_id"])
        assert model.config["steps"] == 20 and model.config["size"] == "tiny"
        assert model.config["processes"] == 2 and model.config["batch_size"] == 8
        assert model.config["image_size"] == 48 and model.config["view"] == "whole"
        assert run.params["draws"] == 4 and run.params["all_labels"] and run.params["precision"] == "fp16"
        assert run.params["mine"] == {"per_label": 20, "clusters": 3, "support_share": 0, "patch_size": 10}
        assert run.params["tile_stride"] == "full"
    home = client.get("/.json").json()
    runs = home["datasets"][0]["runs"]
    assert runs[0]["id"] == 2 and runs[0]["status"] == "queued" and runs[0]["job"]["id"] == 4


@pytest.mark.parametrize("field,value,message", [
    ("steps", "many", "steps must be a whole number"),
    ("preset", "slow", "unknown preset"),
    ("backend", "magic", "unknown model backend"),
    ("draws", "0", "draws must be between 1"),
    ("precision", "fp8", "unknown precision"),
    ("processes", "0", "processes must be between 1"),
    ("tile_stride", "quarter", "unknown tile_stride"),
    ("support_share", "some", "support share must be a number"),
    ("support_share", "1.5", "support_share: Input should be less than 1"),
    ("patch_size", "1", "patch size must be between 2"),
])
def test_bad_values_are_explained_inline(client, field, value, message):
    token = form_token(client, "/datasets/1")
    response = client.post("/datasets/1/runs", data={"csrf_token": token, "steps": "20", field: value})
    assert response.status_code == 400 and message in response.text
    assert 'class="error"' in response.text


def test_stable_diffusion_needs_base_weights(client):
    token = form_token(client, "/datasets/1")
    response = client.post("/datasets/1/runs", data={"csrf_token": token,
                                                     "backend": "stable-diffusion"})
    assert response.status_code == 400 and "base weights" in response.text


def test_the_job_is_committed_before_the_redirect_goes_out(mined_settings):
    """A browser follows the redirect at once: the job must already be in the database."""
    from sqlalchemy import func, select

    app = create_app(mined_settings)
    seen = []

    async def watching(scope, receive, send):
        async def spy(message):
            if message["type"] == "http.response.start" and message["status"] == 303:
                with session_scope(mined_settings) as session:
                    seen.append(session.scalar(select(func.count()).select_from(Job)
                                               .where(Job.kind == "pipeline")))
            await send(message)
        await app(scope, receive, spy)

    client = TestClient(watching)
    token = form_token(client, "/datasets/1")
    client.post("/datasets/1/runs", data={"csrf_token": token, "steps": "20"},
                follow_redirects=False)
    assert seen == [1]


def test_a_run_without_a_precision_gets_auto(mined_settings, client):
    token = form_token(client, "/datasets/1")
    response = client.post("/datasets/1/runs", data={"csrf_token": token, "steps": "20"})
    assert response.status_code == 200
    with session_scope(mined_settings) as session:
        job = session.get(Job, 4)
        assert session.get(MiningRun, job.params["run_id"]).params.get("precision", "auto") == "auto"
