"""Ordered labels (years, decades): every cluster's typicality under every label, stored by the
mining job and plotted on the cluster page."""
import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.models import Cluster, ClusterMember, Label, LabelSet, Patch
from app.settings import Settings
from app.web import create_app
from tests.cli_helpers import diffmine_json as cli
from tests.small_data import animal_folder

YEARS = {"Bird": "1990", "Cat": "2000", "Elephant": "2010"}


def test_clusters_of_ordered_labels_get_a_trend(tmp_path):
    source = animal_folder(tmp_path / "src", labels=tuple(YEARS), per_label=10)
    for animal, year in YEARS.items():  # numeric folder names make an ordered label set
        (source / animal).rename(source / year)
    home = tmp_path / "home"
    cli(home, "ingest", str(source), "--name", "years")
    cli(home, "run", "years", "--size", "tiny", "--steps", "20", "--batch-size", "16",
        "--preset", "fast", "--draws", "4", "--per-label", "8", "--clusters", "2",
        "--trend-members", "3")
    settings = Settings(home=home)
    with session_scope(settings) as session:
        assert session.scalar(select(LabelSet.kind)) == "ordinal"
        clusters = session.scalars(select(Cluster).order_by(Cluster.id)).all()
        assert clusters
        for cluster in clusters:
            assert list(cluster.trend) == ["1990", "2000", "2010"]
            # Under its own label, the trend is the median of its first members' patch scores:
            # the same draws and the same boxes as patch selection.
            scores = session.scalars(select(Patch.score).join(ClusterMember)
                                     .where(ClusterMember.cluster_id == cluster.id,
                                            ClusterMember.position < 3)).all()
            own = session.get(Label, cluster.label_id).name
            assert np.isclose(cluster.trend[own], np.median(scores), rtol=0.02, atol=1e-4)
        first = clusters[0].id
    profile = TestClient(create_app(settings)).get(f"/clusters/{first}.json").json()["profile"]
    assert profile["source"] == "trend"
    assert [p["label"] for p in profile["points"]] == ["1990", "2000", "2010"]
