"""A mined run says how settled it is: every patch's standard error and chance to stay in its
label's top K, every cluster's stability, in the JSON twins, the pages and the exports."""
import csv
import io
import json

import numpy as np
import pytest
from sqlalchemy import select

from app.db import session_scope
from app.models import MiningRun, Patch
from tests.cli_helpers import run_diffmine


def export(settings, *args):
    done = run_diffmine(settings.home_dir, "export", "1", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_patch_has_a_standard_error_and_every_cluster_a_stability(mined_settings):
    with session_scope(mined_settings) as session:
        run = session.get(MiningRun, 1)
        assert "settle" in run.stages_done
        cuts = run.top_k_cuts
        patches = session.execute(select(Patch.id, Patch.label_id, Patch.score, Patch.score_stderr,
                                         Patch.stay).where(Patch.run_id == 1)).all()
    assert all(p.score_stderr > 0 and 0 <= p.stay <= 1 for p in patches)
    # Each label kept its 20 best of more candidates: the cut lies at or below every kept score.
    for p in patches:
        assert p.score >= cuts[str(p.label_id)]
    # Patches further above the cut are more settled (same label, comparable errors).
    by_label = {}
    for p in patches:
        by_label.setdefault(p.label_id, []).append(p)
    label = next(iter(by_label.values()))
    best, worst = max(label, key=lambda p: p.score), min(label, key=lambda p: p.score)
    z = [(p.score - cuts[str(p.label_id)]) / p.score_stderr for p in (best, worst)]
    assert (z[0] > z[1]) == (best.stay > worst.stay)


def test_json_twins_show_stderr_stay_and_stability(client):
    gallery = client.get("/runs/1/labels/1.json?per_page=50&members=100").json()
    clusters = gallery["clusters"]
    for cluster in clusters:
        assert 0 <= cluster["stability"] <= 1
        stays = [m["stay"] for m in cluster["members"]]
        assert len(stays) == cluster["size"]
        assert cluster["stability"] == pytest.approx(sum(stays) / len(stays))
        assert all(m["stderr"] > 0 for m in cluster["members"])
    # Ranked by the support-shrunk median, and it is stored with the cluster.
    ranking = [c["ranking_typicality"] for c in clusters]
    assert ranking == sorted(ranking, reverse=True)
    cluster = client.get(f"/clusters/{clusters[0]['id']}.json").json()
    assert cluster["stability"] == clusters[0]["stability"]
    assert all(m["stderr"] > 0 and 0 <= m["stay"] <= 1 for m in cluster["members"])
    patch = client.get(f"/patches/{cluster['members'][0]['id']}.json").json()
    assert patch["stderr"] == cluster["members"][0]["stderr"]
    # and the pages say it
    assert "stays <strong>" in client.get("/runs/1/labels/1").text
    page = client.get(f"/clusters/{clusters[0]['id']}").text
    assert "Stability <strong>" in page and " ± " in page
    assert " ± " in client.get(f"/patches/{patch['id']}").text


def test_exports_carry_stderr_stay_and_stability(mined_settings):
    data = json.loads(export(mined_settings, "--format", "json"))
    clusters = [c for label in data["labels"] for c in label["clusters"]]
    assert all(0 <= c["stability"] <= 1 and c["ranking_typicality"] is not None for c in clusters)
    members = [m for c in clusters for m in c["members"]]
    assert all(m["typicality_stderr"] > 0 and 0 <= m["stay"] <= 1 for m in members)
    rows = list(csv.DictReader(io.StringIO(export(mined_settings, "--format", "csv"))))
    assert len(rows) == len(members)
    assert float(rows[0]["typicality_stderr"]) == pytest.approx(data["labels"][0]["clusters"][0]["members"][0]
                                                                ["typicality_stderr"])
    assert rows[0]["cluster_stability"] and rows[0]["stay"]
    report = export(mined_settings, "--format", "html")
    assert "of its patches expected to stay in the label&#x27;s top patches under new draws" in report


def test_a_run_mined_before_shows_no_figures_it_does_not_have(mined_settings, client):
    """Runs mined before this existed have no standard errors: the pages show nothing made up."""
    from sqlalchemy import update

    from app.models import Cluster

    with session_scope(mined_settings) as session:
        session.execute(update(Patch).values(score_stderr=None, stay=None))
        session.execute(update(Cluster).values(stability=None, ranking_typicality=None))
    cluster = client.get("/runs/1/labels/1.json").json()["clusters"][0]
    assert cluster["stability"] is None and cluster["members"][0]["stderr"] is None
    assert "stays <strong>" not in client.get("/runs/1/labels/1").text
    assert "Stability" not in client.get(f"/clusters/{cluster['id']}").text
    rows = list(csv.DictReader(io.StringIO(export(mined_settings, "--format", "csv"))))
    assert rows[0]["typicality_stderr"] == "" and rows[0]["cluster_stability"] == ""


def test_support_share_zero_ranks_by_the_plain_median_and_a_bad_share_changes_nothing(mined_settings, capsys):
    from app.models import Cluster
    from tests.cli_helpers import diffmine_in_process

    home = mined_settings.home_dir
    with session_scope(mined_settings) as session:
        before = session.execute(select(Cluster.id, Cluster.rank)).all()
    diffmine_in_process(capsys, "mine", "1", "--per-label", "20", "--clusters", "3", "--support-share", "1.5",
                        home=home, expect=1)
    assert "support_share: Input should be less than 1" in capsys.readouterr().err
    with session_scope(mined_settings) as session:
        assert session.execute(select(Cluster.id, Cluster.rank)).all() == before
    diffmine_in_process(capsys, "mine", "1", "--per-label", "20", "--clusters", "3", "--support-share", "0",
                        home=home)
    with session_scope(mined_settings) as session:
        assert session.get(MiningRun, 1).params["mine"]["support_share"] == 0
        for label_id in {c.label_id for c in session.scalars(select(Cluster))}:
            clusters = session.scalars(select(Cluster).where(Cluster.label_id == label_id)
                                       .order_by(Cluster.rank)).all()
            assert [c.ranking_typicality for c in clusters] == [c.median_typicality for c in clusters]
            medians = [c.median_typicality for c in clusters]
            assert medians == sorted(medians, reverse=True)
    # Clustering again takes a new share without mining again
    diffmine_in_process(capsys, "mine", "1", "--recluster", "--support-share", "0.5", home=home)
    with session_scope(mined_settings) as session:
        assert session.get(MiningRun, 1).params["mine"]["support_share"] == 0.5
        shrunk = session.scalars(select(Cluster)).all()
        assert any(c.ranking_typicality != c.median_typicality for c in shrunk)


def test_standard_errors_read_from_the_score_jobs_draws_equal_a_scoring_again(mined_settings, capsys):
    """The settle stage reads each patch's per-draw values from the block maps the score job
    kept (here blocks of 1 px: the run's 32 px boxes are 6 px); where they are missing it scores
    the images again with the run's draws. Mined again with one shard's blocks tripled and the
    other's gone: the first shard's errors triple (they are read from the blocks), the other's
    are what the blocks gave (scoring again agrees with them)."""
    from tests.cli_helpers import diffmine_in_process

    home = mined_settings.home_dir
    kept = sorted((home / "runs" / "1" / "maps" / "draws").glob("shard-*.npz"))
    assert len(kept) >= 2, "the score job kept no per-draw blocks, or the fixture has one shard"

    def stderrs():
        with session_scope(mined_settings) as session:
            rows = session.execute(select(Patch.image_id, Patch.label_id, Patch.x0, Patch.y0, Patch.score_stderr)
                                   .where(Patch.run_id == 1)).all()
        return {tuple(row[:4]): row[4] for row in rows}

    from_blocks = stderrs()
    with np.load(kept[0]) as data:
        tripled = {key: data[key] * (1 if key.endswith(":shape") else 3) for key in data.files}
    np.savez(kept[0], **tripled)
    for file in kept[1:]:
        file.unlink()
    diffmine_in_process(capsys, "mine", "1", "--per-label", "20", "--clusters", "3", home=home)
    again = stderrs()
    assert again.keys() == from_blocks.keys()
    in_tripled = {int(key.split("_")[0]) for key in tripled if not key.endswith(":shape")}
    assert 0 < sum(image_id in in_tripled for image_id, *_ in again) < len(again)
    for box, error in again.items():
        factor = 3 if box[0] in in_tripled else 1
        assert error == pytest.approx(factor * from_blocks[box], rel=0.02)  # float16 blocks
