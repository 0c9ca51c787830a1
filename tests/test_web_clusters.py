"""Cluster pages: every member linking to its image, the typicality profile across labels, and
the artifact mark, which persists and hides the cluster from the gallery."""
from sqlalchemy import func

from app.db import session_scope
from app.models import Cluster, MiningRun
from tests.web_helpers import form_token


def test_cluster_page_lists_members_in_order_with_links_to_images(client):
    data = client.get("/clusters/1.json").json()
    assert data["label"]["name"] == "Bear" and data["run"]["id"] == 1
    positions = [m["position"] for m in data["members"]]
    assert positions == list(range(len(positions))) and len(positions) == data["size"]
    distances = [m["distance"] for m in data["members"]]
    assert distances == sorted(distances)
    html = client.get("/clusters/1").text
    for member in data["members"]:
        assert f'href="/images/{member["image"]}?run=1&amp;label=1"' in html
        assert f'href="/patches/{member["id"]}"' in html


def test_members_page_by_page(client):
    data = client.get("/clusters/2.json?limit=2").json()
    assert len(data["members"]) == 2 and data["next_offset"] == 2
    rest = client.get("/clusters/2?offset=2&limit=2", headers={"HX-Request": "true"})
    assert rest.status_code == 200 and "<html" not in rest.text and 'class="member"' in rest.text


def test_profile_across_labels(client):
    profile = client.get("/clusters/1.json").json()["profile"]
    assert len(profile["points"]) == 10  # all-label scores: one value per label
    assert all(isinstance(p["value"], float) for p in profile["points"])
    assert "<svg" in client.get("/clusters/1").text


def test_stored_trend_is_plotted_in_label_order(mined_settings, client):
    with session_scope(mined_settings) as session:
        session.get(Cluster, 1).trend = {"Cat": 0.3, "Bear": 0.1}
    profile = client.get("/clusters/1.json").json()["profile"]
    assert profile["source"] == "trend"
    assert [(p["label"], p["value"]) for p in profile["points"]] == [("Bear", 0.1), ("Cat", 0.3)]


def test_marking_an_artifact_persists_and_hides_it_from_the_gallery(mined_settings, client):
    before = [c["id"] for c in client.get("/runs/1/labels/1.json").json()["clusters"]]
    assert 1 in before
    token = form_token(client, "/clusters/1")
    response = client.post("/clusters/1/artifact", data={"artifact": "1", "csrf_token": token})
    assert response.status_code == 200 and response.url.path == "/clusters/1"
    assert "marked as artifact" in response.text
    with session_scope(mined_settings) as session:
        assert session.get(Cluster, 1).is_artifact is True
    gallery = client.get("/runs/1/labels/1.json").json()
    assert 1 not in [c["id"] for c in gallery["clusters"]] and gallery["artifacts_hidden"] == 1
    shown = client.get("/runs/1/labels/1.json?artifacts=1").json()
    assert [c["is_artifact"] for c in shown["clusters"] if c["id"] == 1] == [True]
    assert "Show 1 artifact cluster" in client.get("/runs/1/labels/1").text
    # htmx: the button swaps in place; unmarking brings the cluster back.
    fragment = client.post("/clusters/1/artifact", data={"artifact": "0"},
                           headers={"HX-Request": "true", "X-CSRF-Token": token})
    assert "Mark as artifact" in fragment.text and "<html" not in fragment.text
    assert 1 in [c["id"] for c in client.get("/runs/1/labels/1.json").json()["clusters"]]


def test_unknown_cluster_is_404(client):
    assert client.get("/clusters/999.json").status_code == 404


def test_recluster_leaves_out_look_alikes_and_keeps_the_mark(mined_settings, client, start_worker):
    from sqlalchemy import select

    from app.models import ClusterMember, Job

    token = form_token(client, "/clusters/1")
    client.post("/clusters/1/artifact", data={"artifact": "1", "csrf_token": token})
    with session_scope(mined_settings) as session:
        marked = set(session.scalars(select(ClusterMember.patch_id)
                                     .where(ClusterMember.cluster_id == 1)).all())
    page = client.get("/runs/1/labels/1").text
    assert 'action="/runs/1/recluster"' in page
    response = client.post("/runs/1/recluster", data={"csrf_token": form_token(client, "/runs/1/labels/1")})
    assert response.status_code == 200 and response.url.path == "/runs/1"
    with session_scope(mined_settings) as session:
        job = session.scalars(select(Job).order_by(Job.id.desc())).first()
        assert (job.kind, job.params) == ("mine", {"run_id": 1})
        assert "clusters" not in session.get(MiningRun, 1).stages_done
    worker = start_worker(mined_settings.home_dir, "--exit-when-idle", "--poll", "0.2")
    assert worker.wait(timeout=300) == 0, worker.stderr.read()
    with session_scope(mined_settings) as session:
        assert session.get(Job, job.id).status == "succeeded"
        artifact = session.get(Cluster, 1)  # the mark persists, with its members, ranked last
        assert artifact.is_artifact and artifact.rank == session.scalar(
            select(func.max(Cluster.rank)).where(Cluster.run_id == 1, Cluster.label_id == artifact.label_id))
        others = set(session.scalars(select(ClusterMember.patch_id).join(Cluster)
                                     .where(Cluster.run_id == 1, Cluster.id != 1)).all())
        assert session.scalar(select(func.count()).where(ClusterMember.cluster_id == 1)) == len(marked)
    assert marked and not marked & others  # its members (and their look-alikes) left every cluster
    assert 1 not in [c["id"] for c in client.get("/runs/1/labels/1.json").json()["clusters"]]


def test_recluster_before_features_is_refused(mined_settings, client):
    with session_scope(mined_settings) as session:
        session.get(MiningRun, 1).stages_done = ["score"]
    response = client.post("/runs/1/recluster", data={"csrf_token": form_token(client, "/clusters/1")})
    assert response.status_code == 409 and "no features yet" in response.text
