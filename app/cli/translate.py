"""`diffmine translate`: a patch or an image region under every label, or with --parallel N the
consistent changes over N sampled images."""
from __future__ import annotations

import argparse

from app import catalog
from app.cli.common import CommandError, add_queue_flags, command, create_rows, run_job
from app.params import ParallelMine, TranslationOptions, ValidationError, readable
from app.settings import Settings


@command("translate")
def cmd_translate(args, settings: Settings) -> dict:
    """A patch or an image region into every label (interactive job), or with --parallel N the
    consistent-change analysis of N sampled images (worker/handlers/translate.py, parallel.py)."""
    try:
        options = TranslationOptions(preset=args.preset, invert_steps=args.invert_steps,
                                     sample_steps=args.sample_steps, guidance=args.guidance,
                                     seed=args.seed, sdedit_strength=args.sdedit, context=args.context)
    except ValidationError as error:
        raise CommandError(readable(error)) from error
    if args.parallel is not None:
        return translate_parallel(args, settings, options)
    if args.patch is None and (args.run is None or args.image is None):
        raise CommandError("give --patch ID, or --run RUN --image IMAGE_ID [--box x0,y0,x1,y1]")
    return translate_region(args, settings, options, parse_box(args.box) if args.box else None)


def translate_parallel(args, settings: Settings, options: TranslationOptions) -> dict:
    from app.services.translation_jobs import launch_parallel

    if args.run is None:
        raise CommandError("--parallel needs --run RUN")
    job_id = create_rows(settings, lambda session: launch_parallel(
        session, run_id=args.run, images=args.parallel, options=options,
        mine=ParallelMine(clusters=args.clusters)).id)
    result = run_job(args, settings, job_id, "parallel dataset")
    if not args.json and "summary" in result:
        print(f"Parallel set of {result['images']} images x {len(result['labels'])} labels: "
              f"{result['patches']} patches in {result['clusters']} clusters ({result['summary']})")
    return result


def parse_box(text: str) -> list[int]:
    try:
        box = [int(float(v)) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise CommandError(f"--box wants x0,y0,x1,y1 in original pixels, got {text!r}")
    return box


def translate_region(args, settings: Settings, options: TranslationOptions, box: list[int] | None) -> dict:
    from app.models import MiningRun, TrainedModel, Translation
    from app.services.runs import labels_of

    def launch(session):
        if args.patch is not None:
            from app.services.translations import request_translation

            row, job = request_translation(session, patch_id=args.patch, options=options)
        else:
            from app.services.translation_jobs import request_region_translation

            run = session.get(MiningRun, args.run)
            if run is None:
                raise CommandError(f"no run {args.run}")
            row, job = request_region_translation(session, model_id=run.model_id, image_id=args.image,
                                                  box=box, options=options)
        model = session.get(TrainedModel, row.model_id)
        return row.id, job, [label.name for label in labels_of(session, model.label_set_id)]

    translation_id, job_id, labels = create_rows(settings, launch)
    cached = job_id is None
    if job_id is not None:
        outcome = run_job(args, settings, job_id, "translate")
        if args.queue:
            return {"translation": translation_id, **outcome, "labels": labels}
    from app.db import session_scope

    with session_scope(settings) as session:
        row = session.get(Translation, translation_id)
        results, result_dir, status = list(row.results or []), row.result_dir, row.status
    errors = [r["reconstruction_error"] for r in results if r.get("reconstruction_error") is not None]
    result = {"translation": translation_id, "status": status, "cached": cached,
              "labels": [r["label"] for r in results], "result_dir": result_dir, "results": results,
              "reconstruction_error": errors[0] if errors else None}
    if not args.json:
        print(f"Translation {translation_id}{' (cached)' if cached else ''}: {result_dir}"
              + (f", reconstruction RMSE {errors[0]:.3f}" if errors else ""))
        for r in results:
            print(f"  {r['label']:<20} typicality {r['typicality']:+.4f} (source {r['source_typicality']:+.4f})"
                  f"{'  [source label]' if r['is_source'] else ''}  {r['crop']}")
    return result


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    translate = sub.add_parser("translate", parents=[common],
                               help="a patch or image region under every label; --parallel N: consistent changes")
    translate.add_argument("--patch", type=int, help="a mined patch id")
    translate.add_argument("--run", type=int, help="a run id (with --image, or --parallel)")
    translate.add_argument("--image", type=int, help="an image id of the run's dataset")
    translate.add_argument("--box", help="x0,y0,x1,y1 in original pixels (default: the whole image)")
    translate.add_argument("--preset", choices=tuple(catalog.TRANSLATION_PRESETS), default="fast",
                           help="; ".join(f"{k}: {v}" for k, v in catalog.TRANSLATION_PRESETS.items()))
    translate.add_argument("--invert-steps", type=int)
    translate.add_argument("--sample-steps", type=int)
    translate.add_argument("--guidance", type=float, help="classifier-free guidance (paper and Stable "
                           "Diffusion: 7.5; fast preset on pixel models: 3)")
    translate.add_argument("--sdedit", type=float, help="SDEdit strength in (0, 1] instead of inversion")
    translate.add_argument("--context", type=float, help="translate a square window this many box sides wide")
    translate.add_argument("--seed", type=int, default=0)
    translate.add_argument("--parallel", type=int, metavar="N", help="translate N sampled images of --run "
                           "into every label and mine consistent changes")
    translate.add_argument("--clusters", type=int, help="with --parallel: k-means clusters")
    add_queue_flags(translate)
