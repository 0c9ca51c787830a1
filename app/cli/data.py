"""Datasets: `diffmine ingest` and `diffmine datasets`."""
from __future__ import annotations

import argparse

from app.cli.common import add_queue_flags, command, progress_bar, queue_or_wait
from app.params import IngestJob
from app.settings import Settings


@command("ingest")
def cmd_ingest(args, settings: Settings) -> dict:
    from app.ingest import default_dataset_name, ingest_dataset

    # Named here, not in the service, so that a queued job's parameters carry the name too.
    name = args.name or default_dataset_name(args.source)
    params = IngestJob(source=args.source, name=name, manifest=args.manifest,
                       path_column=args.path_column, label_columns=args.label_column or [],
                       bin_years=args.bin, multi_sep=args.multi_sep, holdout=args.holdout,
                       in_place=args.in_place, seed=args.seed, limit_per_label=args.limit_per_label,
                       render_size=args.render_size,
                       min_images_per_label=args.min_per_label, plant_mark=args.plant_mark,
                       plant_fraction=args.plant_fraction, plant_size=args.plant_size)
    queued = queue_or_wait(args, settings, "ingest", params)
    if queued is not None and "dataset" not in queued:
        return queued
    result = queued or ingest_dataset(settings, **params.model_dump(exclude={"remove_after", "display_source"}),
                                      progress=progress_bar("ingest", args.json)).as_json()
    if not args.json:
        print_ingested(result)
    return result


def print_ingested(result: dict) -> None:
    """The human summary of an ingest (also printed by `diffmine demo`)."""
    print(f"Ingested {result['images']} images into dataset {result['dataset']!r} "
          f"({result.get('duplicates', 0)} duplicates kept once).")
    for set_name, counts in result.get("label_sets", {}).items():
        print(f"  {set_name}: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))


@command("datasets")
def cmd_datasets(args, settings: Settings) -> dict:
    from app.ingest import BUILTINS
    from app.services.datasets import list_datasets

    datasets = list_datasets(settings)
    if not args.json:
        if not datasets:
            print("No datasets yet. Try: diffmine ingest builtin:twemoji --name twemoji")
        for ds in datasets:
            print(f"{ds['name']}: {ds['images']} images")
            for label_set in ds["label_sets"]:
                labels = ", ".join(f"{label['name']} ({label['images']})" for label in label_set["labels"])
                print(f"  {label_set['name']} [{label_set['kind']}]: {labels}")
        print("Builtin datasets (diffmine ingest builtin:NAME): " + ", ".join(BUILTINS))
    return {"datasets": datasets, "builtin": BUILTINS}


@command("doctor")
def cmd_doctor(args, settings: Settings) -> dict:
    from app.db import upgrade

    upgrade(settings)
    report = clean_up(settings, dry_run=args.dry_run, full=True)
    if not args.json:
        verb = "Would remove" if args.dry_run else "Removed"
        print(f"{verb} {len(report['staging'])} staging folders left by stopped processes, "
              f"{report['files']} files no row references ({report['bytes']:,} bytes), "
              f"{report['workers']} records of stopped workers.")
        for name in report["staging"]:
            print(f"  staging/{name}")
        if report["in_use"]:
            print("Left alone (in use by a live process or a queued job): "
                  + ", ".join(f"staging/{name}" for name in report["in_use"]))
    return report


def clean_up(settings: Settings, *, dry_run: bool, full: bool) -> dict:
    """The sweep of `diffmine doctor` (full: also every file under images/ and thumbs/ that no
    row references) and of `diffmine serve` as it starts (staging only)."""
    from app.db import session_scope
    from app.ingest.staging import sweep
    from app.jobs import Workers, expire_dead_owners, prune_dead_workers

    report = sweep(settings, dry_run=dry_run, unreferenced=full).as_json()
    workers = Workers.of(settings)
    report["workers"] = len(workers.dead)
    if not dry_run:
        # Jobs of dead workers resume at the next claim; then their records can go.
        with session_scope(settings) as session:
            expire_dead_owners(session, workers)
        prune_dead_workers(settings)
    return report


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    ingest = sub.add_parser("ingest", parents=[common], help="add a labeled image dataset")
    ingest.add_argument("source", help="a zip, a folder, or builtin:twemoji / builtin:animals")
    ingest.add_argument("--name", help="dataset name (default: the builtin's name for builtin:NAME, "
                                       "the file name without its suffix for a zip or CSV, the "
                                       "folder's name for a folder)")
    ingest.add_argument("--manifest", help="CSV, TSV, JSONL or JSON manifest, read by its suffix "
                        "(else sniffed) (default: manifest.csv/.jsonl in the source)")
    ingest.add_argument("--path-column")
    ingest.add_argument("--label-column", action="append", help="repeatable: one label set each")
    ingest.add_argument("--bin", type=int, help="bin numeric labels into ranges of this many years")
    ingest.add_argument("--multi-sep", default="|", help="separator of several labels in one cell")
    ingest.add_argument("--holdout", type=float, default=0.1, help="fraction kept for evaluation")
    ingest.add_argument("--in-place", action="store_true", help="reference a server folder, don't copy")
    ingest.add_argument("--seed", type=int, default=0)
    ingest.add_argument("--limit-per-label", type=int, help="builtin datasets: sample this many per label")
    ingest.add_argument("--render-size", type=int, metavar="PX",
                        help="builtin:twemoji: render its SVG emoji at PX x PX (default 72)")

    ingest.add_argument("--min-per-label", type=int, help="fewest images a label may have")
    ingest.add_argument("--plant-mark", metavar="LABEL",
                        help="paint a known mark into some of LABEL's images (a ground truth "
                             "for `diffmine evaluate`)")
    ingest.add_argument("--plant-fraction", type=float, default=0.5)
    ingest.add_argument("--plant-size", type=float, default=0.3, help="mark side / image side")
    add_queue_flags(ingest)

    sub.add_parser("datasets", parents=[common], help="list datasets, label sets and counts")

    doctor = sub.add_parser("doctor", parents=[common],
                            help="remove what killed processes left: staging folders, files no "
                                 "row references (never what a live process or queued job uses)")
    doctor.add_argument("--dry-run", action="store_true", help="only say what would be removed")
