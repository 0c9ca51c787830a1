"""CSV, TSV, JSONL and JSON manifests: a path column and one or more label columns.

The format follows the file's suffix (.csv, .tsv, .jsonl or .ndjson, .json: a list of objects);
any other name is sniffed: "[" starts JSON, "{" JSONL, anything else CSV. Errors name the manifest
(the path it was given by, or its name in the zip or folder) and the row: a line of CSV, TSV or
JSONL, an item of JSON.

A numeric column (a year) can be binned (`bin_years=10` gives "1950s"); a column can hold several
labels separated by `multi_sep` (multi-label, e.g. diseases). An optional `boxes` column holds
region annotations as JSON: [[x0, y0, x1, y1, "label"], ...].
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from app.ingest.entries import Entry, LabelSetSpec
from app.ingest.errors import IngestError
from app.ingest.paths import safe_relpath

PATH_COLUMNS = ("path", "image", "file", "filename")
ANNOTATION_COLUMNS = {"boxes", "split", "title"}
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "labels.csv", "labels.jsonl")
#: the suffixes read by format; a manifest with another suffix is sniffed
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


@dataclass
class ManifestOptions:
    path_column: str | None = None
    label_columns: list[str] = field(default_factory=list)
    bin_years: int | None = None
    multi_sep: str = "|"


def find_manifest(files: dict[str, Callable[[], bytes]], manifest: Path | None, *,
                  max_bytes: int, display_name: str | None = None
                  ) -> tuple[str | None, str | None, bytes | None]:
    """(its key in `files` or None, the name errors give it, its bytes); all None when the source
    has no manifest. A manifest given by a path on disk is named by `display_name`, else by that
    path."""
    if manifest is not None:
        if manifest.is_file():
            name = display_name or str(manifest)
            if manifest.stat().st_size > max_bytes:
                raise IngestError(f"manifest is {manifest.stat().st_size} bytes, more than the "
                                  f"limit of {max_bytes}", path=name)
            return None, name, manifest.read_bytes()
        key = manifest.as_posix()
        if key in files:
            return key, key, files[key]()
        raise IngestError("manifest not found", path=display_name or str(manifest))
    for name in MANIFEST_NAMES:
        if name in files:
            return name, name, files[name]()
    return None, None, None


def manifest_format(name: str, text: str) -> str:
    """csv, tsv, jsonl or json: by the suffix, else by the first character."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return "jsonl" if suffix == ".ndjson" else suffix[1:]
    first = text.lstrip()[:1]
    return "json" if first == "[" else "jsonl" if first == "{" else "csv"


def read_rows(data: bytes, name: str) -> list[tuple[int, dict]]:
    """(row number, row) pairs: the line number in CSV, TSV and JSONL, the item number in JSON."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError("manifest is not UTF-8 text", path=name) from exc
    kind = manifest_format(name, text)
    if kind == "json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # several values: one object a line, i.e. JSONL
                raise IngestError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path=name) from exc
            kind = "jsonl"
        else:
            if not isinstance(items, list):
                raise IngestError("a JSON manifest is a list of objects, one per image", path=name)
            rows = list(enumerate(items, 1))
    if kind == "jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise IngestError(f"line {number} is not JSON ({exc.msg})", path=name) from exc
    elif kind in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if kind == "tsv" else ",")
        rows = [(reader.line_num, row) for row in reader]
        for number, row in rows:
            if None in row:
                raise IngestError(f"row {number} has more fields than the header", path=name)
    for number, row in rows:
        if not isinstance(row, dict):
            raise IngestError(f"row {number} is not a JSON object", path=name)
    return [(number, {unicodedata.normalize("NFC", str(k)): v for k, v in row.items()})
            for number, row in rows]


def bin_label(value: str, years: int, *, row: int, column: str) -> str:
    try:
        number = float(value)
    except ValueError as exc:
        raise IngestError(f"row {row}: column {column!r} value {value!r} is not a number, "
                          f"so it cannot be binned") from exc
    start = int(math.floor(number / years) * years)
    return f"{start}s" if years == 10 else f"{start}-{start + years - 1}"


def cell_labels(value, options: ManifestOptions, *, row: int, column: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value)):
        raise IngestError(f"row {row}: column {column!r} holds {json.dumps(value)[:60]}; a label "
                          f"is a string or a number, or a list of them")
    parts = value if isinstance(value, list) else str(value).split(options.multi_sep)
    labels = [str(p).strip() for p in parts if str(p).strip()]
    if options.bin_years:
        labels = [bin_label(v, options.bin_years, row=row, column=column) for v in labels]
    return labels


def entries_from_manifest(data: bytes, name: str | None, files: dict[str, Callable[[], bytes]],
                          local_paths: dict[str, Path] | None, options: ManifestOptions, *,
                          where: str = "the upload"
                          ) -> tuple[list[Entry], dict[str, LabelSetSpec]]:
    """`where` names what the paths are looked up in ("the folder", "the upload")."""
    name = name or "manifest"
    rows = read_rows(data, name)
    if not rows:
        raise IngestError("manifest has no rows", path=name)
    columns = list(dict.fromkeys(column for _, row in rows for column in row))
    nfc = functools.partial(unicodedata.normalize, "NFC")
    path_column = nfc(options.path_column) if options.path_column else next(
        (c for c in PATH_COLUMNS if c in columns), None)
    if path_column not in columns:
        raise IngestError(f"no path column (looked for {options.path_column or PATH_COLUMNS}); "
                          f"columns are {columns}", path=name)
    label_columns = [nfc(c) for c in options.label_columns] or [
        c for c in columns if c != path_column and c not in ANNOTATION_COLUMNS]
    missing = [c for c in label_columns if c not in columns]
    if missing or not label_columns:
        raise IngestError(f"label column(s) {missing or '(none)'} not in manifest columns "
                          f"{columns}", path=name)
    entries = []
    for number, row in rows:
        if row.get(path_column) in (None, ""):
            raise IngestError(f"row {number}: no image path in column {path_column!r}", path=name)
        rel = safe_relpath(str(row[path_column]))
        if rel not in files:
            raise IngestError(f"row {number}: image {rel!r} is not in {where}", path=name)
        try:
            labels = {c: cell_labels(row.get(c), options, row=number, column=c) for c in label_columns}
        except IngestError as error:
            raise IngestError(str(error), path=name) from None
        extra = {"boxes": _boxes(row["boxes"], row=number, name=name)} if row.get("boxes") else None
        entries.append(Entry(path=rel, read=files[rel], labels=labels, extra=extra,
                             in_place_path=local_paths.get(rel) if local_paths else None))
    specs = {c: LabelSetSpec(kind="ordinal") for c in label_columns if options.bin_years}
    return entries, specs


def _boxes(value, *, row: int, name: str) -> list:
    try:
        boxes = json.loads(value) if isinstance(value, str) else value
        assert isinstance(boxes, list) and all(len(b) in (4, 5) for b in boxes)
        return boxes
    except (json.JSONDecodeError, AssertionError, TypeError) as exc:
        raise IngestError(f"row {row}: boxes must be JSON [[x0, y0, x1, y1, label?], ...]",
                          path=name) from exc
