"""Turn a zip or a folder into Entries: one subfolder per label, or a manifest.

Every structural check (unsafe paths, symlinks, zip bombs) runs before any image is read, so a
bad archive is refused before anything is written.
"""
from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.ingest.entries import Entry, LabelSetSpec
from app.ingest.errors import IngestError
from app.ingest.manifest import ManifestOptions, entries_from_manifest, find_manifest
from app.ingest.paths import is_ignored, safe_relpath

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: compression methods zipfile reads (stored, deflate, bzip2, lzma)
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
#: general-purpose flag bits of a zip entry that zipfile cannot read without a password or at all
ZIP_ENCRYPTED, ZIP_PATCHED, ZIP_STRONG_ENCRYPTION = 0x1, 0x20, 0x40


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int
    max_total_bytes: int
    max_ratio: float
    #: one file (an image, a manifest) is read into memory whole: a larger one is refused unread
    max_file_bytes: int


def source_limits(settings) -> ZipLimits:
    return ZipLimits(settings.max_zip_entries, settings.max_upload_bytes, settings.max_zip_ratio,
                     settings.max_file_bytes)


# --- zips ---------------------------------------------------------------------------------
def check_zip(archive: zipfile.ZipFile, limits: ZipLimits) -> list[zipfile.ZipInfo]:
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if len(infos) > limits.max_entries:
        raise IngestError(f"zip has {len(infos)} files, more than the limit {limits.max_entries}")
    total = 0
    for info in infos:
        safe_relpath(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IngestError("symbolic links are not accepted in a zip", path=info.filename)
        if info.flag_bits & (ZIP_ENCRYPTED | ZIP_STRONG_ENCRYPTION):
            raise IngestError("the zip entry is encrypted (password-protected); zip the files "
                              "again without a password", path=info.filename)
        if info.compress_type not in ZIP_METHODS or info.flag_bits & ZIP_PATCHED:
            raise IngestError(f"the zip entry uses compression method {info.compress_type}"
                              f"{' (patched data)' if info.flag_bits & ZIP_PATCHED else ''}, which "
                              f"is not supported; zip the files again with the usual method "
                              f"(deflate)", path=info.filename)
        if info.file_size > limits.max_file_bytes:
            raise IngestError(f"file is {info.file_size} bytes, more than the limit of "
                              f"{limits.max_file_bytes} for one file", path=info.filename)
        if info.file_size > 1_000_000 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise IngestError(
                f"compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 "
                f"exceeds {limits.max_ratio:.0f}:1 (zip bomb?)", path=info.filename)
        total += info.file_size
    if total > limits.max_total_bytes:
        raise IngestError(f"zip expands to {total} bytes, more than the limit "
                          f"{limits.max_total_bytes} (zip bomb?)")
    return infos


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        # zipfile stops at the declared size, so a bomb cannot inflate past what check_zip
        # allowed; a header that lies about the size then fails the CRC check at that point.
        try:
            with archive.open(info) as handle:
                return handle.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise IngestError(f"corrupt zip entry ({error}); its size or checksum does not match "
                              "its header", path=info.filename) from None
        except (RuntimeError, NotImplementedError) as error:  # check_zip refuses what it knows
            raise IngestError(f"the zip entry cannot be read ({error})", path=info.filename) from None
    return read


def zip_files(archive: zipfile.ZipFile, limits: ZipLimits) -> dict[str, Callable[[], bytes]]:
    return {safe_relpath(i.filename): _zip_reader(archive, i)
            for i in check_zip(archive, limits) if not is_ignored(safe_relpath(i.filename))}


# --- folders ------------------------------------------------------------------------------
def folder_files(root: Path, *, max_file_bytes: int) -> dict[str, Path]:
    """Every regular file under root, by relative path; symlinks are refused, not followed, and
    so is a file larger than one may be."""
    found: dict[str, Path] = {}
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            for item in it:
                rel = Path(item.path).relative_to(root).as_posix()
                if is_ignored(rel):
                    continue
                if item.is_symlink():
                    raise IngestError("symbolic links are not accepted", path=rel)
                if item.is_dir(follow_symlinks=False):
                    stack.append(Path(item.path))
                elif item.is_file(follow_symlinks=False):
                    size = item.stat(follow_symlinks=False).st_size
                    if size > max_file_bytes:
                        raise IngestError(f"file is {size} bytes, more than the limit of "
                                          f"{max_file_bytes} for one file", path=rel)
                    found[rel] = Path(item.path)
    return dict(sorted(found.items()))


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


# --- from files to entries ----------------------------------------------------------------
def strip_common_folder(names: list[str]) -> str:
    """A zip of a folder wraps everything in one top folder; return that prefix ("" if none)."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all(n.count("/") >= 2 for n in names):
        return tops.pop() + "/"
    return ""


def entries_from_label_folders(files: dict[str, Callable[[], bytes]],
                               local_paths: dict[str, Path] | None) -> Iterator[Entry]:
    prefix = strip_common_folder(list(files))
    for name, read in files.items():
        rel = name[len(prefix):]
        if "/" not in rel:
            raise IngestError("file lies outside any label folder; use one subfolder per label "
                              "or a manifest", path=name)
        label = rel.split("/", 1)[0]
        yield Entry(path=name, read=read, labels={"label": [label]},
                    in_place_path=local_paths.get(name) if local_paths else None)


def open_source(source: Path, *, manifest: Path | None, options: ManifestOptions,
                limits: ZipLimits, in_place: bool, manifest_name: str | None = None
                ) -> tuple[list[Entry], dict[str, LabelSetSpec], Callable[[], None]]:
    """Entries of a zip or folder, their label-set specs, and a function that closes the source.
    `manifest_name` is what errors call a manifest given by a path (default: that path)."""
    if not source.exists():
        raise IngestError("no such file or folder", path=str(source))
    if source.is_dir():
        local = folder_files(source, max_file_bytes=limits.max_file_bytes)
        files = {rel: _file_reader(p) for rel, p in local.items()}
        local_paths = local if in_place else None
        close = lambda: None  # noqa: E731
    elif zipfile.is_zipfile(source):
        if in_place:
            raise IngestError("--in-place needs a folder, not a zip", path=str(source))
        archive = zipfile.ZipFile(source)
        files, local_paths, close = zip_files(archive, limits), None, archive.close
    else:
        raise IngestError("not a zip file or a folder", path=str(source))
    try:
        manifest_key, manifest_name, manifest_bytes = find_manifest(
            files, manifest, max_bytes=limits.max_file_bytes, display_name=manifest_name)
        if manifest_bytes is not None:
            files.pop(manifest_key, None)
            entries, specs = entries_from_manifest(
                manifest_bytes, manifest_name, files, local_paths, options,
                where="the folder" if source.is_dir() else "the upload")
        else:
            entries, specs = list(entries_from_label_folders(files, local_paths)), {}
    except BaseException:
        close()
        raise
    return entries, specs, close
