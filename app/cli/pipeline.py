"""The mining pipeline: `diffmine train`, `score`, `mine`, `artifact`, `run` (the first three in
one go) and `evaluate`."""
from __future__ import annotations

import argparse
import os

from app import catalog
from app.cli.common import CommandError, add_queue_flags, command, create_rows, run_job
from app.params import EvaluateJob, MineOptions, RunParams
from app.settings import Settings


@command("train")
def cmd_train(args, settings: Settings) -> dict:
    from app.services.runs import launch_train

    if args.base and args.backend == "pixel" and not os.path.isdir(args.base):
        raise CommandError(f"--base {args.base}: no such model folder")
    if args.accelerate_config and not os.path.isfile(args.accelerate_config):
        raise CommandError(f"--accelerate-config {args.accelerate_config}: no such file")
    job_id = create_rows(settings, lambda session: launch_train(
        session, settings, **train_options(args))[1].id)
    result = run_job(args, settings, job_id, "train")
    if not args.json and "model" in result:
        accuracy = result.get("classifier_accuracy")
        loss = result["final_loss"]
        print(f"Trained model {result['model']}: {result['steps']} steps"
              + (f", final loss {loss:.4f}" if loss is not None else " (the model before fine-tuning)")
              + (f", holdout classifier accuracy {accuracy:.1%}" if accuracy is not None else ""))
    return result


def train_options(args) -> dict:
    return dict(dataset=args.dataset, label_set=args.label_set, backend=args.backend, seed=args.seed,
                base=args.base, resolution=args.resolution, image_size=args.image_size, view=args.view,
                steps=args.steps,
                batch_size=args.batch_size, size=args.size, lr=args.lr,
                checkpoint_every=args.checkpoint_every, processes=args.processes,
                accelerate_config=args.accelerate_config and os.path.abspath(args.accelerate_config))


@command("score")
def cmd_score(args, settings: Settings) -> dict:
    from app.services.runs import launch_score

    job_id = create_rows(settings, lambda session: launch_score(
        session, model_id=args.model, params=run_params(args))[1].id)
    result = run_job(args, settings, job_id, "score")
    if not args.json and "run" in result:
        print(f"Scored {result['images']} images: run {result['run']}")
    return result


@command("mine")
def cmd_mine(args, settings: Settings) -> dict:
    from app.services.runs import launch_mine, launch_recluster

    if args.recluster:
        launch = lambda session: launch_recluster(  # noqa: E731
            session, run_id=args.run, lookalike_threshold=args.lookalike_threshold,
            support_share=args.support_share).id
    else:
        launch = lambda session: launch_mine(session, run_id=args.run, mine=mine_options(args)).id  # noqa: E731
    result = run_job(args, settings, create_rows(settings, launch), "mine")
    if not args.json and "patches" in result:
        print(f"Run {result['run']}: {result['patches']} patches in {result['clusters']} clusters"
              + (f" ({result['artifact_clusters']} marked as artifacts)"
                 if result.get("artifact_clusters") else ""))
    return result


def mine_options(args) -> MineOptions:
    return MineOptions(patch_size=args.patch_size, per_label=args.per_label, clusters=args.clusters,
                       per_image=args.per_image, selection=args.selection,
                       trend_members=args.trend_members, lookalike_threshold=args.lookalike_threshold,
                       support_share=args.support_share)


def run_params(args) -> RunParams:
    """`score`'s options (and `run`'s, with its mining options)."""
    mine = mine_options(args) if hasattr(args, "per_label") else MineOptions()
    return RunParams(preset=args.preset, draws=args.draws, precision=args.precision,
                     all_labels=args.all_labels, seed=args.seed, shard_size=args.shard_size,
                     image_size=args.image_size, tile_stride=args.tile_stride, mine=mine)


@command("artifact")
def cmd_artifact(args, settings: Settings) -> dict:
    from app.services.runs import mark_artifact

    def mark(session):
        cluster = mark_artifact(session, cluster_id=args.cluster, artifact=not args.unmark)
        return {"cluster": cluster.id, "run": cluster.run_id, "is_artifact": cluster.is_artifact}

    result = create_rows(settings, mark)
    if not args.json:
        state = "marked as an artifact" if result["is_artifact"] else "no longer an artifact"
        print(f"Cluster {result['cluster']} {state}; re-cluster without its look-alikes: "
              f"diffmine mine {result['run']} --recluster")
    return result


@command("run")
def cmd_run(args, settings: Settings) -> dict:
    from app.services.runs import launch_pipeline

    options = {k: v for k, v in train_options(args).items() if k != "seed"}
    job_id = create_rows(settings, lambda session: launch_pipeline(
        session, settings, **options, run=run_params(args))[2].id)
    result = run_job(args, settings, job_id, "train, score, mine")
    if not args.json and "run" in result:
        print(f"Model {result['model']}, run {result['run']}: {result.get('patches')} patches in "
              f"{result.get('clusters')} clusters. See them with: diffmine serve")
    return result


@command("evaluate")
def cmd_evaluate(args, settings: Settings) -> dict:
    from app.jobs import enqueue
    from app.models import MiningRun

    def launch(session):
        if session.get(MiningRun, args.run) is None:
            raise CommandError(f"no run {args.run}")
        return enqueue(session, kind="evaluate", params=EvaluateJob(
            run_id=args.run, draws=args.draws, max_images=args.max_images)).id

    result = run_job(args, settings, create_rows(settings, launch), "evaluate")
    if not args.json and "classifier_accuracy" in result:
        print(f"Holdout diffusion classifier: {result['classifier_accuracy']:.1%} on "
              f"{result['classifier_images']} images (chance {result['chance']:.1%})")
        if "box_auc_pr" in result:
            print(f"Typicality map vs boxes: AUC-PR {result['box_auc_pr']:.3f} "
                  f"(positive rate {result['box_positive_rate']:.3f})")
        for label, overlap in result.get("mark_overlap", {}).items():
            top = overlap["top_cluster"]
            print(f"Planted mark in {label!r}: top cluster {top:.0%} on the mark, "
                  f"all patches {overlap['all_patches']:.0%}" if top is not None else
                  f"Planted mark in {label!r}: all patches {overlap['all_patches']:.0%}")
    return result


# --- parsers --------------------------------------------------------------------------------
def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="train a conditional denoiser")
    train.add_argument("dataset", help="dataset name or id")
    add_train_flags(train)
    add_queue_flags(train)

    score = sub.add_parser("score", parents=[common], help="typicality of every image")
    score.add_argument("model", type=int, help="model id")
    add_score_flags(score)
    add_queue_flags(score)

    mine = sub.add_parser("mine", parents=[common], help="patches, features and clusters of a run")
    mine.add_argument("run", type=int, help="run id (from diffmine score)")
    add_mine_flags(mine)
    mine.add_argument("--recluster", action="store_true",
                      help="only cluster again, leaving out look-alikes of artifact clusters "
                           "(takes --lookalike-threshold and --support-share)")
    add_queue_flags(mine)

    artifact = sub.add_parser("artifact", parents=[common],
                              help="mark a cluster as a dataset artifact (scanner border, watermark)")
    artifact.add_argument("cluster", type=int)
    artifact.add_argument("--unmark", action="store_true", help="take the mark back")

    run = sub.add_parser("run", parents=[common], help="train, score and mine in one go")
    run.add_argument("dataset")
    # One --seed for the three steps, after the flags of train and score.
    add_train_flags(run, seed=False)
    add_score_flags(run, seed=False, image_size=False)
    run.add_argument("--seed", type=int, default=0)
    add_mine_flags(run)
    add_queue_flags(run)

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="holdout classifier accuracy, box and planted-mark metrics")
    evaluate.add_argument("run", type=int)
    evaluate.add_argument("--draws", type=int, help="draws per label for the classifier (default 16)")
    evaluate.add_argument("--max-images", type=int, help="holdout images used (default 1000)")
    add_queue_flags(evaluate)


def add_train_flags(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """The options of `train`, also `run`'s (which adds its own --seed, hence seed=False)."""
    parser.add_argument("--label-set", help="which label set (default: the only one)")
    parser.add_argument("--backend", choices=catalog.BACKENDS, default="pixel")
    parser.add_argument("--base", help="weights to start from: a model folder (or SD folder/hub id)")
    parser.add_argument("--resolution", type=int, help="side of the square crops the model trains on "
                        "(pixel default 32)")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="resize images so their shorter side is N: training crops are taken from "
                             "them and scoring sees every pixel at that size (default: the resolution; "
                             "stable-diffusion: a multiple of 64, both sides rounded to multiples of 64)")
    parser.add_argument("--view", choices=catalog.VIEWS,
                        help="how scoring sees an image: whole (default: every pixel, any shape) or "
                             "centre-crop (the central square, as models from before image sizes)")
    parser.add_argument("--steps", type=int, help="0: the model before fine-tuning, as a baseline")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--size", choices=catalog.PIXEL_SIZES, help="pixel model width")
    parser.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-4, the fine-tuning recipe's; "
                                                 "a pixel model trained from scratch learns faster at 1e-3)")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int,
                        help="train under `accelerate launch` with this many processes (one per GPU), "
                             "followed by the job; the batch size is split over them")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="an `accelerate config` file for the launch (several machines)")


def add_score_flags(parser: argparse.ArgumentParser, *, seed: bool = True, image_size: bool = True) -> None:
    """The options of `score`, also `run`'s (which adds its own --seed and takes --image-size
    from the training flags)."""
    if image_size:
        parser.add_argument("--image-size", type=int, metavar="N",
                            help="score images resized to shorter side N (default: the model's image size; "
                                 "stable-diffusion: a multiple of 64)")
    parser.add_argument("--preset", choices=tuple(catalog.TYPICALITY_PRESETS), default="paper",
                        help="paper: 100 draws per image; fast: 24 stratified; adaptive: 12, then the paper's "
                             "100 for the images whose boxes may reach a label's top patches (the per-label "
                             "count the run is mined with: `run --per-label`, else 1000)")
    parser.add_argument("--draws", type=int, help="override the preset's number of draws")
    parser.add_argument("--precision", choices=catalog.PRECISIONS, default="auto",
                        help="denoiser autocast while scoring; auto: fp16 for Stable Diffusion on a GPU "
                        "(on an H200: 4.9-6.5x faster, closer to fp32 than fp32 is to itself under "
                        "another seed), else fp32 (pixel models ran slower in fp16; CPUs 2-4x slower)")
    parser.add_argument("--all-labels", action="store_true",
                        help="also score every image under every label (diffusion classifier)")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, help="images per resumable shard (default 64)")
    parser.add_argument("--tile-stride", choices=tuple(catalog.TILE_STRIDES),
                        help="images larger than a pixel model's training crops (R px) are scored "
                             "through R x R tiles; " + "; ".join(
                                 f"{name}: {text}" for name, text in catalog.TILE_STRIDES.items()))


def add_mine_flags(parser: argparse.ArgumentParser) -> None:
    """The options of `mine`, also `run`'s."""
    parser.add_argument("--patch-size", type=int, help="box side in model pixels (default: scaled "
                                                        "from the paper's 50 px at 256 px); for elements "
                                                        "much smaller, near their size keeps them in one "
                                                        "cluster (docs/method.md)")
    parser.add_argument("--per-label", type=int, help="patches kept per label (paper: 1000)")
    parser.add_argument("--per-image", type=int, help="boxes per image (paper: 5)")
    parser.add_argument("--lookalike-threshold", type=float,
                        help="re-clustering leaves out patches whose centred DIFT features have a cosine "
                             "above this with an artifact cluster's member (default 0.6)")
    parser.add_argument("--clusters", type=int, help="k-means clusters per label (paper: 32)")
    parser.add_argument("--support-share", type=float,
                        help="clusters rank by their median typicality shrunk toward the label's median by "
                             "this share of the label's patches (default 0.05; 0: the paper's plain median)")
    parser.add_argument("--trend-members", type=int,
                        help="ordered labels: members per cluster scored under every label (default 16)")
    parser.add_argument("--selection", choices=catalog.SELECTIONS,
                        help="which patches: the most typical (the method), or a baseline")
