"""A multipart form read as it arrives: the file part streamed straight to a file on disk (never
held in memory), stopped as soon as it passes the size limit; text fields kept small."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 50


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class StreamedForm:
    fields: dict[str, str] = field(default_factory=dict)
    file_name: str | None = None  # as the browser named it
    file_path: Path | None = None  # where it lies now
    size: int = 0


def safe_file_name(name: str) -> str:
    """A browser's file name reduced to a harmless basename (its extension kept)."""
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^A-Za-z0-9._ -]+", "_", base).strip(" .") or "upload"
    return base[-120:]


async def stream_form(request: Request, *, directory: Path, max_bytes: int,
                      before_file: Callable[[StreamedForm], None] | None = None) -> StreamedForm:
    """Parse a multipart/form-data request; the one file part goes to `directory`.

    `before_file(form)` runs when the file part starts, with the fields sent before it (the
    CSRF token comes first): it may raise to refuse the upload before a byte is written."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"application/x-www-form-urlencoded":  # fields only: a server folder
        fields = await request.form(max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
        return StreamedForm(fields={k: v for k, v in fields.items() if isinstance(v, str)})
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(400, "send the upload as a multipart/form-data form")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + MAX_FIELD_BYTES * 4:
        raise UploadError(413, _too_large(max_bytes))
    form = StreamedForm()
    state = {"headers": {}, "field": None, "name": None, "value": bytearray(), "out": None,
             "header_field": b"", "header_value": b""}
    events: list = []

    def on_part_begin():
        state["headers"], state["header_field"], state["header_value"] = {}, b"", b""

    def on_header_field(data, start, end):
        state["header_field"] += data[start:end]

    def on_header_value(data, start, end):
        state["header_value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished():
        events.append(("start", dict(state["headers"])))

    def on_part_data(data, start, end):
        events.append(("data", bytes(data[start:end])))

    def on_part_end():
        events.append(("end", None))

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            for kind, value in events:
                _handle(kind, value, form, state, directory, max_bytes, before_file)
            events.clear()
        parser.finalize()
        for kind, value in events:
            _handle(kind, value, form, state, directory, max_bytes, before_file)
    except BaseException:
        if state["out"] is not None:
            state["out"].close()
        if form.file_path is not None:
            form.file_path.unlink(missing_ok=True)
        raise
    return form


def _handle(kind, value, form: StreamedForm, state, directory: Path, max_bytes: int, before_file):
    if kind == "start":
        _, options = parse_options_header(value.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None and filename != b"":
            if form.file_path is not None:
                raise UploadError(400, "send one file at a time")
            if before_file is not None:
                before_file(form)
            form.file_name = filename.decode("utf-8", "replace")
            directory.mkdir(parents=True, exist_ok=True)
            form.file_path = directory / safe_file_name(form.file_name)
            state["out"] = open(form.file_path, "wb")
            state["field"] = "file"
        elif filename == b"":
            state["field"] = "empty-file"  # a file input left empty
        else:
            if len(form.fields) >= MAX_FIELDS:
                raise UploadError(400, "too many form fields")
            state["field"], state["name"], state["value"] = "text", name, bytearray()
    elif kind == "data":
        if state["field"] == "file":
            form.size += len(value)
            if form.size > max_bytes:
                raise UploadError(413, _too_large(max_bytes))
            state["out"].write(value)
        elif state["field"] == "text":
            state["value"] += value
            if len(state["value"]) > MAX_FIELD_BYTES:
                raise UploadError(400, f"the form field {state['name']!r} is too long")
    elif kind == "end":
        if state["field"] == "file":
            state["out"].close()
            state["out"] = None
        elif state["field"] == "text":
            form.fields[state["name"]] = state["value"].decode("utf-8", "replace")
        state["field"] = None


def _too_large(max_bytes: int) -> str:
    return (f"The upload is larger than the limit of {human_bytes(max_bytes)} "
            f"(DIFFMINE_MAX_UPLOAD_BYTES). Put the data on the server and give its folder path "
            f"instead, or raise the limit.")


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
