"""The method finds what was planted: a mark painted into one label's images becomes that
label's top cluster, while baselines do not find it."""
from tests.cli_helpers import diffmine_json as cli
from tests.small_data import animal_folder


def export(home):
    return cli(home, "export", "1", "--format", "json")


def test_planted_mark_is_the_top_cluster_of_its_label(tmp_path):
    source = animal_folder(tmp_path / "src", labels=("Bird", "Cat", "Elephant"), per_label=40)
    home = tmp_path / "home"
    cli(home, "ingest", str(source), "--name", "p", "--plant-mark", "Cat", "--plant-fraction", "1")
    # lr 1e-3, not the fine-tuning recipe's 1e-4: a model from scratch, trained in a minute.
    cli(home, "run", "p", "--size", "tiny", "--steps", "150", "--batch-size", "16", "--lr", "1e-3",
        "--preset", "fast", "--draws", "8", "--per-label", "40", "--clusters", "3")
    typical = cli(home, "evaluate", "1", "--draws", "4", "--max-images", "12")
    assert typical["mark_overlap"]["Cat"]["top_cluster"] >= 0.8
    assert typical["box_auc_pr"] > 3 * typical["box_positive_rate"]

    # Treated as an artifact (as a scanner border would be), the mark's cluster and its
    # look-alikes leave Cat's clusters (here nearly all of them: every Cat image has the mark).
    before = next(label for label in export(home)["labels"] if label["name"] == "Cat")["clusters"]
    cli(home, "artifact", str(before[0]["id"]))
    cli(home, "mine", "1", "--recluster")
    without = cli(home, "evaluate", "1", "--draws", "4", "--max-images", "12")
    top = without["mark_overlap"]["Cat"]["top_cluster"]
    assert top is None or top <= 0.5
    after = next(label for label in export(home)["labels"] if label["name"] == "Cat")["clusters"]
    assert after[-1]["id"] == before[0]["id"] and after[-1]["is_artifact"] is True
    assert after[-1]["size"] == before[0]["size"]  # the marked cluster keeps its members
    # ...and more than its own members left: their look-alikes too
    assert sum(c["size"] for c in after) < sum(c["size"] for c in before)

    cli(home, "mine", "1", "--per-label", "40", "--clusters", "3", "--selection", "least")
    least = cli(home, "evaluate", "1", "--draws", "4", "--max-images", "12")
    # The least typical patches of the same label mostly miss the mark.
    assert (least["mark_overlap"]["Cat"]["all_patches"]
            <= typical["mark_overlap"]["Cat"]["all_patches"] - 0.25)
    # Mined again with new patches, the artifact cluster (its members gone) goes too.
    assert not any(c["is_artifact"] for label in export(home)["labels"] for c in label["clusters"])
