"""Large uploads are ingested by the worker, so the web process stays responsive."""
from __future__ import annotations

import shutil
from pathlib import Path

from app.ingest import IngestError, ingest_dataset
from app.services.datasets import dataset_by_name
from app.services.uploads import set_dataset_source
from worker.context import JobContext


def run_ingest(context: JobContext) -> dict:
    job = context.job
    # An upload from the web: its staged file is removed once the ingest is over for good,
    # and the dataset is recorded by its name in the browser ("upload:photos.zip").
    remove_after, display_source = job.remove_after, job.display_source
    existing = dataset_by_name(context.settings, job.name)
    if existing is not None and existing["source"] in (job.source, display_source):
        # A previous attempt committed and then lost its worker: the ingest is done, but what
        # came after its commit may not be.
        _finish(context, job.name, remove_after, display_source)
        return {"dataset": existing["name"], "images": existing["images"], "resumed": True}
    # An ingest is all-or-nothing, so it is not preempted halfway.
    context.preemptible = False
    def progress(done: int, total: int) -> None:
        context.check()  # a cancel stops here; the ingest then removes what it staged
        context.progress(done, total, stage="ingest")

    try:
        report = ingest_dataset(context.settings, **job.model_dump(exclude={"remove_after", "display_source"}),
                                progress=progress,
                                staging_key=f"job-{context.job_id}")
    except IngestError:
        _remove_upload(context, remove_after)  # bad input: a retry would fail the same way
        raise
    _finish(context, report.dataset, remove_after, display_source)
    return report.as_json()


def _finish(context: JobContext, name: str, remove_after: str | None, display_source: str | None) -> None:
    """After the commit: the staged upload goes, and the dataset gets the name the user saw."""
    _remove_upload(context, remove_after)
    if display_source:
        set_dataset_source(context.settings, name, display_source)


def _remove_upload(context: JobContext, path: str | None) -> None:
    if path and Path(path).resolve().is_relative_to(context.settings.staging_dir / "uploads"):
        shutil.rmtree(path, ignore_errors=True)
