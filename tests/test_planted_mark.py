"""The method finds what was planted: a mark painted into one label's images becomes that
label's top cluster, while baselines do not find it."""
import json
import subprocess
import sys

from tests.small_data import animal_folder


def cli(home, *args):
    done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--home", str(home), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_planted_mark_is_the_top_cluster_of_its_label(tmp_path):
    source = animal_folder(tmp_path / "src", labels=("Bird", "Cat", "Elephant"), per_label=40)
    home = tmp_path / "home"
    cli(home, "ingest", str(source), "--name", "p", "--plant-mark", "Cat", "--plant-fraction", "1")
    cli(home, "run", "p", "--size", "tiny", "--steps", "300", "--batch-size", "32",
        "--preset", "fast", "--draws", "16", "--per-label", "40", "--clusters", "3")
    typical = cli(home, "evaluate", "1", "--draws", "4", "--max-images", "12")
    assert typical["mark_overlap"]["Cat"]["top_cluster"] >= 0.8
    assert typical["box_auc_pr"] > 3 * typical["box_positive_rate"]

    cli(home, "mine", "1", "--per-label", "40", "--clusters", "3", "--selection", "least")
    least = cli(home, "evaluate", "1", "--draws", "4", "--max-images", "12")
    # The least typical patches of the same label mostly miss the mark.
    assert (least["mark_overlap"]["Cat"]["all_patches"]
            <= typical["mark_overlap"]["Cat"]["all_patches"] - 0.25)
