"""The catalog and the typed parameters agree with the engine, and stored params still load."""
from __future__ import annotations

import pytest

from app import catalog, params
from app.params import (
    BACKEND_DEFAULTS,
    MineOptions,
    ParallelJob,
    RunParams,
    TrainConfig,
    TranslationOptions,
    ValidationError,
    job_params,
)


def check_catalog(names: tuple, declared) -> None:
    """A Literal type of app/params.py lists exactly the catalog's names."""
    assert tuple(declared.__args__) == tuple(names), (declared, names)


def test_engine_presets_are_the_catalogs():
    from worker.engine import presets, translation

    assert sorted(presets.PRESETS) == sorted(catalog.TYPICALITY_PRESETS)
    from worker.engine.tiles import TILE_STRIDES

    assert tuple(TILE_STRIDES) == tuple(catalog.TILE_STRIDES)
    assert sorted(translation.PRESETS) == sorted(catalog.TRANSLATION_PRESETS)
    for name, numbers in params.TRANSLATION_PRESET_NUMBERS.items():
        assert translation.get_preset(name).kwargs() == numbers


def test_literal_types_list_the_catalogs_names():
    check_catalog(tuple(catalog.TYPICALITY_PRESETS), params.Preset)
    check_catalog(tuple(catalog.TRANSLATION_PRESETS), params.TranslationPresetName)
    check_catalog(catalog.BACKENDS, params.Backend)
    check_catalog(catalog.VIEWS, params.View)
    check_catalog(catalog.PRECISIONS, params.Precision)
    check_catalog(catalog.SELECTIONS, params.Selection)
    check_catalog(tuple(catalog.TILE_STRIDES), params.TileStride)
    assert set(BACKEND_DEFAULTS) == set(catalog.BACKENDS)


def test_the_engines_names_and_paper_numbers_match():
    from worker.engine import patches, registry
    from worker.engine.pixel import SIZES

    assert registry.BACKENDS == catalog.BACKENDS
    assert tuple(SIZES) == catalog.PIXEL_SIZES
    mine = MineOptions()
    assert (mine.per_label, mine.per_image, mine.clusters) == (patches.PER_LABEL, patches.PER_IMAGE, 32)


def test_every_job_kind_has_a_handler_and_a_params_model():
    from worker.handlers import handler_for

    assert set(catalog.JOB_KINDS) == set(params.JOB_PARAMS)
    for kind in catalog.JOB_KINDS:
        assert callable(handler_for(kind))
    with pytest.raises(ValueError, match="unknown job kind 'export'"):
        job_params("export", {})


def test_params_stored_before_the_typed_models_still_load():
    # A run as the services wrote it: unset values as null, mining options given by the user.
    stored = {"preset": "fast", "draws": None, "all_labels": True, "seed": 3, "precision": "fp32",
              "mine": {"per_label": 100, "clusters": 8, "trend_members": 3, "trend_draws": 4},
              "shard_size": None, "evaluation": {"classifier_accuracy": 0.5}}
    run = RunParams.model_validate(stored)
    assert (run.preset, run.draws, run.seed, run.shard_size) == ("fast", None, 3, 64)
    assert (run.mine.per_label, run.mine.per_image, run.mine.lookalike_threshold) == (100, 5, 0.6)
    assert RunParams.model_validate({"preset": "paper", "seed": 0}).mine == MineOptions()
    config = TrainConfig.model_validate({"resolution": 32, "steps": 2000, "batch_size": 256,
                                         "size": "small", "seed": 0, "shipped": "demo/weights/x"})
    assert config.learning_rate == 1e-4 and config.checkpoint_every == 100 and not config.launched
    # a parallel job's params as the service stored them
    job = ParallelJob.model_validate({"run_id": 1, "images": 4, "translation": {"invert_steps": 8},
                                      "mine": {"clusters": 2}})
    assert job.translation.resolved()["invert_steps"] == 8 and job.mine.clusters == 2


def test_bad_values_are_refused_with_their_name():
    with pytest.raises(ValidationError, match="lookalike_threshold"):
        MineOptions(lookalike_threshold=1.5)
    with pytest.raises(ValidationError, match="preset"):
        RunParams(preset="warp")
    with pytest.raises(ValidationError, match="unknown_option"):
        TranslationOptions.model_validate({"unknown_option": 1})
    with pytest.raises(ValueError, match="does not split evenly"):
        TrainConfig.for_backend("pixel", batch_size=30, processes=4)
    with pytest.raises(ValueError, match="unknown backend"):
        TrainConfig.for_backend("vae")
    assert params.readable(_error(lambda: MineOptions(clusters=0))).startswith("clusters:")


def test_translation_options_have_one_spelling():
    assert TranslationOptions(guidance=3).canonical("pixel") == {}
    assert TranslationOptions(preset="reference").canonical("pixel") == {
        "invert_steps": 999, "sample_steps": 50, "guidance": 7.5}
    assert TranslationOptions(draws=9).resolved()["draws"] == 8


def _error(build) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        build()
    return caught.value


def test_stable_diffusion_scores_whole_images_with_sides_of_64_px():
    from worker.engine import registry

    assert registry.SIDE_MULTIPLES == catalog.SIDE_MULTIPLES
    assert TrainConfig.for_backend("stable-diffusion", base="sd").view == "whole"
    assert TrainConfig.for_backend("stable-diffusion", base="sd", image_size=768).scoring_size == 768
    with pytest.raises(ValueError, match="image size 700 px: stable-diffusion needs image sides that are "
                                         "multiples of 64 px .* try 704"):
        TrainConfig.for_backend("stable-diffusion", base="sd", image_size=700)
    with pytest.raises(ValueError, match="resolution 100 px"):
        TrainConfig.for_backend("stable-diffusion", base="sd", resolution=100, image_size=128)
    assert TrainConfig.for_backend("pixel", image_size=50).scoring_size == 50  # pixel models: any size
    # an SD model stored before whole views keeps the centre square it was scored through
    stored = {"resolution": 512, "steps": 5000, "batch_size": 8, "seed": 0, "view": "centre-crop", "base": "sd"}
    assert TrainConfig.model_validate(stored).view == "centre-crop"
    params.check_side_multiple("stable-diffusion", 640, "image size")
    with pytest.raises(ValueError, match="try 640"):
        params.check_side_multiple("stable-diffusion", 650, "image size")
