"""The forms' defaults and choices: the upload form (home page and /upload) and the run form
(dataset page). Choices come from the catalog, so a backend or precision added there shows here."""
from __future__ import annotations

from app import catalog
from app.web.upload_stream import human_bytes

#: The run form's choices and defaults: "fast" is the quick look, "paper" the reference recipe.
RUN_DEFAULTS = {"preset": "fast", "backend": "pixel", "steps": 1500, "draws": None, "size": "small",
                "resolution": None, "image_size": None, "batch_size": None, "per_label": None, "clusters": None,
                "patch_size": None, "support_share": None, "all_labels": True, "seed": 0, "base": "",
                "precision": "auto", "processes": None, "tile_stride": "half"}
#: what the run form offers, from the catalog
RUN_CHOICES = {"presets": catalog.TYPICALITY_PRESETS, "backends": catalog.BACKENDS,
           "precisions": catalog.PRECISIONS, "sizes": catalog.PIXEL_SIZES,
           "tile_strides": catalog.TILE_STRIDES}




def form_defaults() -> dict:
    """The upload form's fields as first shown."""
    return {"name": "", "server_path": "", "label_column": "", "bin": "", "holdout": "0.1",
            "in_place": "", "seed": "0"}


def upload_limits(settings) -> dict:
    return {"max_upload_bytes": settings.max_upload_bytes,
            "max_upload": human_bytes(settings.max_upload_bytes),
            "min_images_per_label": settings.min_images_per_label}
