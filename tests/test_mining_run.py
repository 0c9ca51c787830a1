"""A real mined run (tiny model, real pipeline): patches, features, clusters and their order."""
import numpy as np
from sqlalchemy import func, select

from app.cli import main as diffmine
from app.db import session_scope
from app.models import Cluster, ClusterMember, ImageLabel, ImageScore, MiningRun, Patch
from tests.cli_helpers import diffmine_in_process, diffmine_json, run_diffmine


def cluster_table(settings):
    with session_scope(settings) as session:
        return session.execute(
            select(Cluster.label_id, Cluster.rank, Cluster.median_typicality, ClusterMember.position,
                   Patch.image_id, Patch.x0, Patch.y0).join(ClusterMember, ClusterMember.cluster_id == Cluster.id)
            .join(Patch, Patch.id == ClusterMember.patch_id)
            .order_by(Cluster.label_id, Cluster.rank, ClusterMember.position)).all()


def test_every_image_is_scored_once_per_label(mined_settings):
    with session_scope(mined_settings) as session:
        pairs = session.execute(select(ImageScore.image_id, func.count()).group_by(ImageScore.image_id)).all()
        maps = session.scalar(select(func.count()).where(ImageScore.map_path.is_not(None)))
    assert len(pairs) == 120 and {n for _, n in pairs} == {10}  # --all-labels: every label
    assert maps == 1200  # --all-labels keeps a map under every label too


def test_patches_clusters_and_their_order(mined_settings):
    home = mined_settings.home_dir
    with session_scope(mined_settings) as session:
        run = session.get(MiningRun, 1)
        assert run.status == "ready"
        assert set(run.stages_done) == {"score", "patches", "settle", "features", "clusters", "crops",
                                        "label_scores", "map"}
        patches = session.scalars(select(Patch)).all()
        assert 0 < len(patches) <= 10 * 20
        # Patches of a label come from its images, though the run kept maps under every label.
        own = set(session.execute(select(ImageLabel.image_id, ImageLabel.label_id)).tuples())
        assert {(p.image_id, p.label_id) for p in patches} <= own
        for patch in patches:
            assert (home / patch.crop_path).is_file()
            assert 0 <= patch.x0 < patch.x1 <= 28 and 0 <= patch.y0 < patch.y1 <= 28
        rows = {p.feature_row for p in patches}
        assert rows == set(range(len(patches)))  # every patch has its own index row
        for label_id in {p.label_id for p in patches}:
            clusters = session.scalars(select(Cluster).where(Cluster.label_id == label_id)
                                       .order_by(Cluster.rank)).all()
            # Ranked by the median shrunk toward the label's median by size (docs/method.md section 4).
            ranking = [c.ranking_typicality for c in clusters]
            assert ranking == sorted(ranking, reverse=True)
            label_median = float(np.median([p.score for p in patches if p.label_id == label_id]))
            for c in clusters:
                low, high = sorted((c.median_typicality, label_median))
                assert low - 1e-9 <= c.ranking_typicality <= high + 1e-9
            assert sum(c.size for c in clusters) == sum(p.label_id == label_id for p in patches)
            for cluster in clusters:
                distances = session.scalars(select(ClusterMember.distance).where(
                    ClusterMember.cluster_id == cluster.id).order_by(ClusterMember.position)).all()
                assert distances == sorted(distances)
    features = np.load(home / "runs/1/features.npy")
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    import faiss

    assert faiss.read_index(str(home / "runs/1/index.faiss")).ntotal == len(features)


def test_mining_again_gives_the_same_clusters(mined_settings):
    before = cluster_table(mined_settings)
    assert diffmine(["mine", "1", "--per-label", "20", "--clusters", "3", "--home",
                     str(mined_settings.home_dir), "--json"]) == 0
    assert cluster_table(mined_settings) == before


def test_the_model_before_fine_tuning_is_a_baseline_through_the_same_pipeline(mined_settings, capsys):
    from safetensors.torch import load_file

    home = mined_settings.home_dir
    base = home / "models/1/weights"
    result = diffmine_in_process(capsys, "run", "animals", "--steps", "0", "--base", str(base), "--size", "tiny",
                                 "--preset", "fast", "--draws", "2", "--per-label", "5", "--clusters", "2",
                                 home=home)
    assert result["steps"] == 0 and result["final_loss"] is None and result["clusters"] > 0
    unet = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(base / unet), load_file(home / f"models/{result['model']}/weights/{unet}")
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_half_precision_scoring_on_a_cpu_worker_fails_clearly_and_keeps_the_run(mined_settings):
    """fp16 autocast is for GPUs; on a CPU worker the job says so and the earlier run is untouched."""
    before = cluster_table(mined_settings)
    done = run_diffmine(mined_settings.home_dir, "score", "1", "--preset", "fast", "--draws", "2",
                        "--precision", "fp16", "--json")
    assert done.returncode != 0
    assert "fp16 scoring needs a GPU" in done.stdout + done.stderr
    assert cluster_table(mined_settings) == before


def test_auto_precision_is_fp16_for_stable_diffusion_on_a_gpu_and_fp32_elsewhere():
    from app.params import RunParams
    from worker.engine.registry import create_pixel_denoiser
    from worker.handlers.score import preset_for, resolved_precision

    assert RunParams().precision == "auto"
    assert resolved_precision("auto", device="cuda", backend="stable-diffusion") == "fp16"
    assert resolved_precision("auto", device="cuda", backend="pixel") == "fp32"  # launch-bound: fp16 was slower
    assert resolved_precision("auto", device="cpu", backend="stable-diffusion") == "fp32"
    assert resolved_precision("bf16", device="cuda", backend="pixel") == "bf16"  # a choice is kept
    cpu_model = create_pixel_denoiser(["a", "b"], resolution=32, seed=0, size="tiny")
    assert preset_for(RunParams(preset="fast"), cpu_model).autocast is None


def test_the_lookalike_threshold_sets_how_much_a_recluster_leaves_out(mined_settings):
    """A lower cosine threshold counts more patches as look-alikes of an artifact cluster."""
    from sqlalchemy import text

    from app.db import engine_for

    home = mined_settings.home_dir
    diffmine_json(home, "artifact", "1")

    def clustered_after(threshold: str) -> int:
        diffmine_json(home, "mine", "1", "--recluster", "--lookalike-threshold", threshold)
        with engine_for(mined_settings.db_url).connect() as conn:
            return conn.execute(text("SELECT count(*) FROM cluster_members m JOIN clusters c "
                                     "ON c.id = m.cluster_id WHERE NOT c.is_artifact")).scalar()

    assert clustered_after("-0.5") < clustered_after("0.99")
    refused = run_diffmine(home, "mine", "1", "--recluster", "--lookalike-threshold", "1.5", timeout=120)
    assert refused.returncode != 0 and "cosine in (-1, 1)" in refused.stderr


def test_the_tile_stride_reaches_the_score_jobs_maps(mined_settings, capsys):
    """`diffmine score --tile-stride full` at an image size twice the training crops: the
    stored map is the engine's at stride 32 (the crops' side), not at the default 16."""
    import torch

    from app.models import TrainedModel
    from app.params import RunParams
    from app.services.runs import examples
    from worker.engine.data import View, multi_hot
    from worker.engine.registry import load_denoiser
    from worker.engine.tiles import tiled_typicality
    from worker.handlers.score import preset_for

    home = mined_settings.home_dir
    refused = run_diffmine(home, "score", "1", "--tile-stride", "quarter", timeout=120)
    assert refused.returncode == 2 and "invalid choice: 'quarter'" in refused.stderr
    run = diffmine_in_process(capsys, "score", "1", "--image-size", "64", "--tile-stride", "full",
                              "--preset", "fast", "--draws", "2", home=home)["run"]
    with session_scope(mined_settings) as session:
        stored = session.get(MiningRun, run)
        params = RunParams.model_validate(stored.params)
        weights = home / session.get(TrainedModel, stored.model_id).weights_dir
        example = examples(session, mined_settings, label_set_id=1, limit=1)[0]
        map_path = session.scalar(select(ImageScore.map_path).where(
            ImageScore.run_id == run, ImageScore.image_id == example.image_id))
    assert params.tile_stride == "full" and run == 2  # run 1, at the default stride, is kept
    file, key = map_path.rsplit(":", 1)
    with np.load(home / file) as data:
        scored = torch.from_numpy(data[key].astype(np.float32))
    denoiser = load_denoiser(weights, device="cpu")
    image = View(64).load(example.path)[None]
    condition = multi_hot([example.label_indices], denoiser.num_labels)

    def at_stride(stride: int) -> torch.Tensor:
        return tiled_typicality(denoiser, image, condition, preset_for(params, denoiser), seed=params.seed,
                                tile=32, stride=stride).maps[0]

    assert scored.shape == (64, 64)
    assert torch.allclose(scored, at_stride(32), atol=2e-3)
    assert not torch.allclose(scored, at_stride(16), atol=2e-3)


def test_mining_again_with_fewer_patches_embeds_the_new_patches(mined_settings):
    """The features stage resumes from the parts it finds: a new mining must not take those of
    the last one (their patches are gone; fewer patches failed, as many took their features)."""
    from sqlalchemy import text

    from app.db import engine_for

    home = mined_settings.home_dir
    again = diffmine_json(home, "mine", "1", "--per-label", "5", "--clusters", "2")
    with engine_for(mined_settings.db_url).connect() as conn:
        rows = conn.execute(text("SELECT feature_row FROM patches WHERE run_id = 1")).scalars().all()
    features = np.load(home / "runs/1/features.npy", mmap_mode="r")
    assert len(rows) == again["patches"] == len(features)
    assert sorted(rows) == list(range(len(features)))
