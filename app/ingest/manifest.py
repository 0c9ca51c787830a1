"""CSV / JSONL manifests: a path column and one or more label columns.

A numeric column (a year) can be binned (`bin_years=10` gives "1950s"); a column can hold several
labels separated by `multi_sep` (multi-label, e.g. diseases). An optional `boxes` column holds
region annotations as JSON: [[x0, y0, x1, y1, "label"], ...].
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.ingest.entries import Entry, LabelSetSpec
from app.ingest.errors import IngestError
from app.ingest.paths import safe_relpath

PATH_COLUMNS = ("path", "image", "file", "filename")
ANNOTATION_COLUMNS = {"boxes", "split", "title"}
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "labels.csv", "labels.jsonl")


@dataclass
class ManifestOptions:
    path_column: str | None = None
    label_columns: list[str] = field(default_factory=list)
    bin_years: int | None = None
    multi_sep: str = "|"


def find_manifest(files: dict[str, Callable[[], bytes]], manifest: Path | None
                  ) -> tuple[str | None, bytes | None]:
    if manifest is not None:
        if manifest.exists():
            return None, manifest.read_bytes()
        key = manifest.as_posix()
        if key in files:
            return key, files[key]()
        raise IngestError("manifest not found", path=str(manifest))
    for name in MANIFEST_NAMES:
        if name in files:
            return name, files[name]()
    return None, None


def read_rows(data: bytes, name: str) -> list[dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError("manifest is not UTF-8 text", path=name) from exc
    if name.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise IngestError(f"line {number} is not JSON ({exc.msg})", path=name) from exc
        return rows
    return list(csv.DictReader(io.StringIO(text)))


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
    parts = value if isinstance(value, list) else str(value).split(options.multi_sep)
    labels = [str(p).strip() for p in parts if str(p).strip()]
    if options.bin_years:
        labels = [bin_label(v, options.bin_years, row=row, column=column) for v in labels]
    return labels


def entries_from_manifest(data: bytes, name: str | None, files: dict[str, Callable[[], bytes]],
                          local_paths: dict[str, Path] | None, options: ManifestOptions
                          ) -> tuple[list[Entry], dict[str, LabelSetSpec]]:
    name = name or "manifest"
    rows = read_rows(data, name)
    if not rows:
        raise IngestError("manifest has no rows", path=name)
    columns = list(rows[0].keys())
    path_column = options.path_column or next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column not in columns:
        raise IngestError(f"no path column (looked for {options.path_column or PATH_COLUMNS}); "
                          f"columns are {columns}", path=name)
    label_columns = options.label_columns or [
        c for c in columns if c != path_column and c not in ANNOTATION_COLUMNS]
    missing = [c for c in label_columns if c not in columns]
    if missing or not label_columns:
        raise IngestError(f"label column(s) {missing or '(none)'} not in manifest columns "
                          f"{columns}", path=name)
    entries = []
    for number, row in enumerate(rows, 2 if not name.endswith(".jsonl") else 1):
        rel = safe_relpath(str(row.get(path_column) or ""))
        if rel not in files:
            raise IngestError(f"row {number}: image {rel!r} is not in the upload", path=name)
        labels = {c: cell_labels(row.get(c), options, row=number, column=c) for c in label_columns}
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
