"""A small but real mined dataset, made by the real pipeline (ingest, train, score, mine) on a
tiny pixel model. Built once per test session and copied into each test that needs it."""
from __future__ import annotations

import shutil
from pathlib import Path

from app.cli import main as diffmine

ANIMALS_PER_LABEL = 12


def build_mined_home(home: Path) -> Path:
    common = ["--home", str(home), "--json"]
    steps = [
        ["ingest", "builtin:animals", "--name", "animals", "--limit-per-label",
         str(ANIMALS_PER_LABEL), "--min-per-label", "5"],
        ["train", "animals", "--size", "tiny", "--steps", "20", "--batch-size", "16"],
        ["score", "1", "--preset", "fast", "--draws", "4", "--all-labels"],
        ["mine", "1", "--per-label", "20", "--clusters", "3"],
    ]
    for argv in steps:
        if diffmine([*argv, *common]) != 0:
            raise RuntimeError(f"building the mined fixture failed at: diffmine {' '.join(argv)}")
    return home


def copy_mined_home(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    return target
