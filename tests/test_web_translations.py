"""Translations from the web: a click records a Translation and an interactive "translate"
job, a repeated click reuses them, the panel polls until the worker fills the row, then shows
the element in every label; a cluster's members are translated for its consistent-change view."""
from sqlalchemy import func, select

from app.db import session_scope
from app.jobs import PRIORITY_INTERACTIVE
from app.models import Job, Patch, Translation
from app.services.translations import request_translation, translation_key
from tests.web_helpers import form_token


def fill(settings, translation_id: int, *, status="ready"):
    """What the worker's translate handler writes."""
    with session_scope(settings) as session:
        t = session.get(Translation, translation_id)
        t.status = status
        t.result_dir = f"runs/1/translations/{t.id}"
        t.results = [{"label": name, "label_id": i, "crop": "runs/1/crops/1.png",
                      "image": "runs/1/crops/1.png", "window": 32, "window_box": [8, 4, 16, 12],
                      "typicality": 0.01 * i, "is_source": i == 1}
                     for i, name in ((1, "Bear"), (2, "Bird"), (3, "Cat"))]
        t.results[0]["reconstruction_error"] = 0.125


def test_translate_records_a_row_and_an_interactive_job(mined_settings, client):
    token = form_token(client, "/patches/1")
    response = client.post("/patches/1/translate", data={"csrf_token": token})
    assert response.status_code == 200 and response.url.path == "/translations/1"
    with session_scope(mined_settings) as session:
        t = session.get(Translation, 1)
        patch = session.get(Patch, 1)
        assert [t.image_id, t.patch_id, t.model_id, t.status] == [patch.image_id, 1, 1, "queued"]
        assert t.box == [patch.x0, patch.y0, patch.x1, patch.y1] and t.params == {}
        assert t.settings_key == translation_key(t.box, {})
        job = session.scalar(select(Job).where(Job.kind == "translate"))
        assert job.params == {"translation_id": 1} and job.priority == PRIORITY_INTERACTIVE
    assert 'hx-trigger="every 1s"' in response.text and "Translating across labels" in response.text


def test_a_second_click_reuses_the_translation_and_its_job(mined_settings, client):
    token = form_token(client, "/patches/1")
    first = client.post("/patches/1/translate.json", data={"csrf_token": token}).json()
    second = client.post("/patches/1/translate.json", data={"csrf_token": token}).json()
    assert first["translation"] == second["translation"] and first["job"] == second["job"]
    with session_scope(mined_settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)
                              .where(Job.kind == "translate")) == 1
    fill(mined_settings, first["translation"])
    third = client.post("/patches/1/translate.json", data={"csrf_token": token}).json()
    assert third == {"translation": first["translation"], "job": None,
                     "url": f"/translations/{first['translation']}"}


def test_the_panel_shows_the_grid_once_ready(mined_settings, client):
    with session_scope(mined_settings) as session:
        translation, job_id = request_translation(session, patch_id=1)
        tid = translation.id
    panel = client.get(f"/translations/{tid}/panel")
    assert 'hx-trigger="every 1s"' in panel.text
    fill(mined_settings, tid)
    panel = client.get(f"/translations/{tid}/panel")
    assert "hx-trigger" not in panel.text
    assert panel.text.count("<figure") == 3 and "source" in panel.text
    # each translated window with the patch outlined where it lies (8..16 of 32 px: 25%, 25% wide)
    assert panel.text.count('class="window-box"') == 3
    assert 'data-style="left: 25.0%; top: 12.5%; width: 25.0%; height: 25.0%"' in panel.text
    assert "reconstruction error 0.125" in panel.text
    data = client.get(f"/translations/{tid}.json").json()
    assert data["ready"] and [r["label"] for r in data["results"]] == ["Bear", "Bird", "Cat"]
    # The patch page shows the cached result straight away.
    assert 'class="translation-grid"' in client.get("/patches/1").text


def test_a_failed_job_is_shown_and_a_new_click_tries_again(mined_settings, client):
    with session_scope(mined_settings) as session:
        translation, job_id = request_translation(session, patch_id=1)
        tid = translation.id
        job = session.get(Job, job_id)
        job.status, job.error = "failed", "ValueError: no handler for job kind 'translate'"
    panel = client.get(f"/translations/{tid}/panel").text
    assert "no handler for job kind" in panel and "hx-trigger" not in panel
    with session_scope(mined_settings) as session:
        again, new_job = request_translation(session, patch_id=1)
        assert again.id == tid and new_job != job_id


def test_translate_a_cluster_for_its_consistent_change_view(mined_settings, client):
    token = form_token(client, "/clusters/2")
    page = client.post("/clusters/2/translate", data={"csrf_token": token})
    assert page.status_code == 200 and page.url.path == "/clusters/2/translations"
    data = client.get("/clusters/2/translations.json").json()
    size = client.get("/clusters/2.json").json()["size"]
    assert len(data["rows"]) == min(size, 8) and data["pending"]
    assert all(r["translation"]["job"]["status"] == "queued" for r in data["rows"])
    assert 'hx-trigger="every 2s"' in page.text
    for row in data["rows"]:
        fill(mined_settings, row["translation"]["id"])
    html = client.get("/clusters/2/translations").text
    assert "hx-trigger" not in html and html.count("<figure") == 3 * len(data["rows"])
