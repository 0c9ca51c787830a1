"""bench/agreement.py: the agreement of two runs' mined patches, on hand-made patch sets."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SPEC = importlib.util.spec_from_file_location("agreement", BENCH / "agreement.py")
agreement = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(agreement)


def patch(label, image, x, cluster, size=10):
    return {"label": label, "image": image, "box": (x, 0, x + size, size), "cluster": cluster}


RUN = [patch(1, 1, 0, 7), patch(1, 2, 0, 7), patch(1, 3, 0, 8), patch(1, 4, 0, 8),
       patch(2, 5, 0, 9), patch(2, 6, 0, 9)]


def test_the_same_patches_under_other_cluster_ids_agree_fully():
    renamed = [dict(p, cluster={7: 1, 8: 2, 9: 3}[p["cluster"]]) for p in RUN]
    assert agreement.top_k_overlap(RUN, renamed) == 1.0
    assert agreement.cluster_agreement(RUN, renamed) == pytest.approx(1.0)


def test_boxes_match_when_they_overlap_enough_and_clusters_are_compared_on_shared_patches():
    other = [patch(1, 1, 3, 7),  # IoU 7/13 >= 0.5: the same patch
             patch(1, 2, 6, 7),  # IoU 4/16: another patch
             patch(1, 3, 0, 7), patch(1, 9, 0, 8),  # image 3 moved to image 1's cluster
             patch(2, 5, 0, 9), patch(2, 6, 0, 9)]
    # Label 1: 2 of 4 patches shared; label 2: 2 of 2. Their mean:
    assert agreement.top_k_overlap(RUN, other) == pytest.approx((2 / 4 + 2 / 2) / 2)
    # Label 1's shared patches (images 1 and 3) were apart and are together: ARI 0 over 2 pairs;
    # label 2's two shared patches are together in both: ARI 1 over 2 pairs.
    assert agreement.cluster_agreement(RUN, other) == pytest.approx((2 * 0 + 2 * 1) / 4)
    assert agreement.top_k_overlap(RUN, [patch(3, 1, 0, 1)]) == 0.0


def test_rank_correlation_and_top_patches():
    import torch

    assert agreement.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert agreement.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    maps = torch.zeros(2, 8, 8)
    maps[0, 5, 5] = maps[1, 0, 0] = 1
    moved = maps.clone()
    moved[1] = 0
    moved[1, 6, 6] = 1
    assert agreement.same_top_patch(maps, moved, 2) == 0.5
