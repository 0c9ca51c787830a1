"""Bringing a dataset in from the browser: a zip (or a manifest for a server folder) streamed to
disk under a size limit, or a folder path on the server. A small zip is ingested at once, so its
errors show inline naming the bad file, unless DIFFMINE_MAX_INLINE_INGESTS others are being
ingested so by this server process; anything larger, or beyond that, becomes an "ingest" job."""
from __future__ import annotations

import shutil
import uuid
import zipfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.db import session_scope
from app.ingest import IngestError, ingest_dataset
from app.ingest.manifest import MANIFEST_SUFFIXES
from app.ingest.sources import check_zip, source_limits
from app.ingest.staging import claim
from app.jobs import enqueue
from app.services.datasets import dataset_id_by_name
from app.services.uploads import set_dataset_source
from app.web.deps import SettingsDep, is_htmx, redirect, render, templates, wants_json
from app.web.forms import form_defaults, upload_limits
from app.web.security import CSRF_FIELD, CSRF_HEADER, csrf_ok
from app.web.upload_stream import StreamedForm, UploadError, stream_form

router = APIRouter(tags=["upload"])

#: Zips up to this size are ingested within the request; larger ones by the worker.
SYNC_INGEST_BYTES = 4 * 2**20
FORM_FIELDS = ("name", "server_path", "label_column", "bin", "holdout", "in_place", "seed")


@router.get("/upload", summary="The upload form")
def upload_page(request: Request, settings: SettingsDep):
    limits = upload_limits(settings)
    return render(request, "upload.html", {"data": limits, "limits": limits,
                                           "form": form_defaults(), "error": None})


@router.post("/upload", summary="Upload a zip or manifest (multipart, field 'file'), or name a "
                                "server folder ('server_path'); options: name, label_column, "
                                "bin, holdout, in_place, seed")
async def upload(request: Request, settings: SettingsDep):
    directory = settings.staging_dir / "uploads" / uuid.uuid4().hex
    # Owned by this request until it ends (a sweep leaves it alone meanwhile); a queued ingest
    # job that reads it keeps it after that (app/ingest/staging.py).
    owner = claim(directory, "upload")
    header_token = request.headers.get(CSRF_HEADER)

    def before_file(form: StreamedForm) -> None:
        if not csrf_ok(request, header_token or form.fields.get(CSRF_FIELD)):
            raise UploadError(403, "This form has expired or was not sent by diffmine's own page: "
                                   "reload the page and try again.")

    form = None
    try:
        form = await stream_form(request, directory=directory, max_bytes=settings.max_upload_bytes,
                                 before_file=before_file)
        before_file(form)  # also when no file was sent
        options = _options(form)
        outcome = await _ingest_or_queue(request, settings, form, options, directory)
    except UploadError as error:
        shutil.rmtree(directory, ignore_errors=True)
        return _refused(request, settings, error.status, error.message, None,
                        form.fields if form else {})
    except IngestError as error:
        shutil.rmtree(directory, ignore_errors=True)
        return _refused(request, settings, 400, str(error), error.path, form.fields if form else {})
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        if form is None or form.file_path is None:
            shutil.rmtree(directory, ignore_errors=True)  # nothing uploaded: a server folder
        owner.release()
    return outcome


def _options(form: StreamedForm) -> dict:
    f = form.fields
    name = (f.get("name") or "").strip()
    if not name and form.file_name:
        name = Path(form.file_name).stem
    if not name and f.get("server_path"):
        name = Path(f["server_path"].strip().rstrip("/")).name.replace("builtin:", "")
    if not name:
        raise UploadError(400, "Give the dataset a name.")
    try:
        holdout = float(f.get("holdout") or 0.1)
    except ValueError:
        raise UploadError(400, f"The holdout fraction must be a number such as 0.1, "
                               f"got {f.get('holdout')!r}.") from None
    if not 0 <= holdout < 1:
        raise UploadError(400, f"The holdout fraction must be at least 0 and below 1, got {holdout}.")
    bin_years = (f.get("bin") or "").strip()
    if bin_years and (not bin_years.isdigit() or int(bin_years) < 1):
        raise UploadError(400, f"Year binning must be a whole number of years such as 10, "
                               f"got {bin_years!r}.")
    seed = (f.get("seed") or "0").strip()
    if not seed.isdigit():
        raise UploadError(400, f"The seed must be a whole number, got {seed!r}.")
    columns = [c.strip() for c in (f.get("label_column") or "").split(",") if c.strip()]
    return {"name": name, "label_columns": columns, "bin_years": int(bin_years) if bin_years else None,
            "holdout": holdout, "seed": int(seed), "in_place": bool(f.get("in_place"))}


async def _ingest_or_queue(request: Request, settings, form: StreamedForm, options: dict,
                           directory: Path):
    server_path = (form.fields.get("server_path") or "").strip()
    with session_scope(settings) as session:
        if dataset_id_by_name(session, options["name"]) is not None:
            raise UploadError(400, f"A dataset named {options['name']!r} already exists: "
                                   f"choose another name.")
    params = dict(options, manifest=None)
    if form.file_path is not None:
        if form.size == 0:
            raise IngestError("the file is empty", path=form.file_name)
        is_zip = zipfile.is_zipfile(form.file_path)
        if is_zip:
            if options["in_place"]:
                raise IngestError("an uploaded zip cannot be referenced in place; leave "
                                  "'in place' unticked", path=form.file_name)
            with zipfile.ZipFile(form.file_path) as archive:  # structure checks: cheap, at once
                check_zip(archive, source_limits(settings))
            params["source"] = str(form.file_path)
            params["display_source"] = f"upload:{form.file_path.name}"
            if server_path:
                raise UploadError(400, "Send a zip or give a server folder, not both (a server "
                                       "folder goes with an uploaded manifest).")
        elif form.file_path.suffix.lower() in MANIFEST_SUFFIXES:
            if not server_path:
                raise IngestError("a manifest lists files on the server: also give the server "
                                  "folder its paths are relative to", path=form.file_name)
            params.update(source=server_path, manifest=str(form.file_path))
        else:
            raise IngestError("not a zip file, nor a CSV, TSV, JSONL or JSON manifest",
                              path=form.file_name)
        # At most settings.max_inline_ingests at once per server process (each decodes images
        # in memory); when they are all taken the upload is queued like a large one.
        slots = request.app.state.inline_ingests
        if is_zip and form.size <= request.app.state.sync_ingest_bytes \
                and slots.acquire(blocking=False):
            try:
                report = await run_in_threadpool(_ingest_now, settings, params)
            finally:
                slots.release()
            shutil.rmtree(directory, ignore_errors=True)
            with session_scope(settings) as session:
                dataset_id = dataset_id_by_name(session, report["dataset"])
            return redirect(request, f"/datasets/{dataset_id}",
                            data=dict(report, dataset_id=dataset_id))
    elif server_path:
        if not server_path.startswith("builtin:") and not Path(server_path).exists():
            raise IngestError("no such file or folder on the server", path=server_path)
        params["source"] = server_path
    else:
        raise UploadError(400, "Choose a zip file to upload, or give a folder path on the server.")
    params["remove_after"] = str(directory) if form.file_path is not None else None
    with session_scope(settings) as session:
        job = enqueue(session, kind="ingest", params={k: v for k, v in params.items() if v is not None})
        job_id = job.id
    return redirect(request, f"/jobs/{job_id}", data={"job": job_id})


def _ingest_now(settings, params: dict) -> dict:
    params = dict(params)
    display_source = params.pop("display_source", None)
    report = ingest_dataset(settings, **params).as_json()
    if display_source:
        set_dataset_source(settings, report["dataset"], display_source)
    return report


def _refused(request: Request, settings, status: int, message: str, path: str | None,
             fields: dict):
    if path and message.startswith(f"{path}: "):
        message = message[len(path) + 2:]
    error = {"message": message, "path": path}
    form = dict(form_defaults(), **{k: v for k, v in fields.items() if k in FORM_FIELDS})
    if wants_json(request):
        return JSONResponse({"detail": message, "path": path}, status_code=status)
    limits = upload_limits(settings)
    context = {"data": dict(limits, error=error), "limits": limits, "form": form, "error": error}
    if is_htmx(request):
        # htmx swaps 2xx answers only: the form comes back with the message in it.
        return templates.TemplateResponse(request, "_upload_form.html", context)
    return render(request, "upload.html", context, status_code=status)
