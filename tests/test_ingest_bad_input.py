"""Every bad upload is refused with a clear error that names the file, and changes nothing."""
import io
import os
import stat
import zipfile

import pytest
from PIL import Image

from app.ingest import IngestError, ingest_dataset
from tests.conftest import label_files, png_bytes, snapshot, write_folder, write_zip


@pytest.fixture
def existing(settings, tmp_path):
    """A dataset already there, so 'unchanged' means something."""
    ingest_dataset(settings, source=str(write_zip(tmp_path / "ok.zip", label_files({"x": 3, "y": 3}, start=500))),
                   name="existing")
    return snapshot(settings)


def refused(settings, before, source, match, **options):
    with pytest.raises(IngestError, match=match):
        ingest_dataset(settings, source=str(source), name=options.pop("name", "bad"), **options)
    assert snapshot(settings) == before


def big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")  # compresses to a few KB
    return buffer.getvalue()


def test_path_traversal_in_zip(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["../../evil.png"] = png_bytes(99)
    refused(settings, existing, write_zip(tmp_path / "t.zip", files), "path traversal")
    assert not (tmp_path.parent / "evil.png").exists()


def test_absolute_path_in_zip(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["/etc/evil.png"] = png_bytes(99)
    refused(settings, existing, write_zip(tmp_path / "t.zip", files), "path traversal")


def test_symlink_in_zip(settings, existing, tmp_path):
    path = write_zip(tmp_path / "s.zip", label_files({"a": 3, "b": 3}))
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    refused(settings, existing, path, "symbolic link")


def test_symlink_in_folder(settings, existing, tmp_path):
    root = write_folder(tmp_path / "f", label_files({"a": 3, "b": 3}))
    os.symlink("/etc/passwd", root / "a" / "link.png")
    refused(settings, existing, root, "symbolic link")


def test_zip_bomb_by_ratio(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["a/bomb.png"] = b"\0" * 50_000_000
    refused(settings, existing, write_zip(tmp_path / "z.zip", files), "zip bomb")


def test_zip_bomb_by_total_size(settings, existing, tmp_path):
    settings.max_upload_bytes = 2_000
    refused(settings, existing, write_zip(tmp_path / "z.zip", label_files({"a": 30, "b": 30})),
            "zip bomb")


def test_zip_entry_larger_than_its_header_says(settings, existing, tmp_path):
    """The central directory claims half of a/0.png's real size: read no further, name the entry."""
    import struct

    archive = bytearray(write_zip(tmp_path / "l.zip", label_files({"a": 3, "b": 3})).read_bytes())
    entry = archive.find(b"PK\x01\x02")  # central directory headers: name at +46, size at +24
    while archive[entry + 46: entry + 46 + len(b"a/0.png")] != b"a/0.png":
        entry = archive.find(b"PK\x01\x02", entry + 1)
    size = struct.unpack_from("<I", archive, entry + 24)[0]
    struct.pack_into("<I", archive, entry + 24, size // 2)
    (tmp_path / "l.zip").write_bytes(archive)
    refused(settings, existing, tmp_path / "l.zip", r"a/0.png: corrupt zip entry")


def test_decompression_bomb_image(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["a/huge.png"] = big_png()
    settings.max_image_pixels = 50_000_000
    refused(settings, existing, write_zip(tmp_path / "h.zip", files), r"a/huge.png: .*decompression bomb")


def test_truncated_image(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["b/cut.png"] = files["b/0.png"][: len(files["b/0.png"]) // 2]
    refused(settings, existing, write_zip(tmp_path / "c.zip", files), r"b/cut.png: corrupt or truncated")


def test_corrupt_image(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    data = bytearray(files["b/1.png"])
    data[60:120] = b"\xff" * 60
    files["b/bad.png"] = bytes(data)
    refused(settings, existing, write_zip(tmp_path / "c.zip", files), r"b/bad.png: corrupt")


def test_non_image_file(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["a/notes.txt"] = b"hello"
    refused(settings, existing, write_zip(tmp_path / "n.zip", files), r"a/notes.txt: not an image")


def test_file_outside_label_folders(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 3})
    files["loose.png"] = png_bytes(77)
    refused(settings, existing, write_zip(tmp_path / "l.zip", files), "outside any label folder")


def test_single_label(settings, existing, tmp_path):
    refused(settings, existing, write_zip(tmp_path / "one.zip", label_files({"only": 5})),
            "single label")


def test_label_with_too_few_images(settings, existing, tmp_path):
    refused(settings, existing, write_zip(tmp_path / "few.zip", label_files({"a": 5, "b": 2})),
            r"fewer than 3 images: 'b' \(2\)")


def test_too_few_after_duplicates_removed(settings, existing, tmp_path):
    files = label_files({"a": 3, "b": 2})
    files["b/dup.png"] = files["b/0.png"]
    refused(settings, existing, write_zip(tmp_path / "dup.zip", files), "fewer than 3")


def test_manifest_naming_a_missing_image(settings, existing, tmp_path):
    files = {f"{i}.png": png_bytes(i) for i in range(6)}
    files["manifest.csv"] = ("path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(6))
                             + "ghost.png,a\n").encode()
    refused(settings, existing, write_zip(tmp_path / "m.zip", files), "'ghost.png' is not in the upload")


def test_manifest_traversal(settings, existing, tmp_path):
    files = {f"{i}.png": png_bytes(i) for i in range(6)}
    files["manifest.csv"] = b"path,label\n../../etc/passwd,a\n"
    refused(settings, existing, write_zip(tmp_path / "m.zip", files), "path traversal")


def test_binning_a_non_number(settings, existing, tmp_path):
    files = {f"{i}.png": png_bytes(i) for i in range(6)}
    files["manifest.csv"] = ("path,year\n" + "".join(f"{i}.png,{1950 + i}\n" for i in range(5))
                             + "5.png,unknown\n").encode()
    refused(settings, existing, write_zip(tmp_path / "m.zip", files), "not a number", bin_years=10)


def test_not_a_zip(settings, existing, tmp_path):
    path = tmp_path / "fake.zip"
    path.write_bytes(b"this is not a zip")
    refused(settings, existing, path, "not a zip file")


def test_existing_name(settings, existing, tmp_path):
    refused(settings, existing, write_zip(tmp_path / "a.zip", label_files({"a": 3, "b": 3})),
            "already exists", name="existing")


def test_unknown_builtin(settings, existing):
    refused(settings, existing, "builtin:nope", "unknown builtin")


def test_failure_after_images_were_staged_leaves_no_files(settings, existing, tmp_path):
    """The last image is bad: the staged copies of the good ones must be removed too."""
    files = label_files({"a": 4, "b": 4})
    files["b/zz_last.png"] = b"\x89PNG\r\n\x1a\n garbage"
    refused(settings, existing, write_zip(tmp_path / "late.zip", files), "zz_last.png")
    assert not any(settings.staging_dir.rglob("*.png"))


def test_html_in_label_names_is_kept_as_text(settings, tmp_path):
    label = '<script>alert("x")</script>'
    files = {f"{i}.png": png_bytes(i) for i in range(6)}
    files["manifest.csv"] = ("path,label\n" + "".join(
        f"{i}.png,\"{label.replace(chr(34), chr(34) * 2)}\"\n" if i < 3 else f"{i}.png,plain\n"
        for i in range(6))).encode()
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "x.zip", files)), name="x")
    assert label in report.label_sets["label"]
