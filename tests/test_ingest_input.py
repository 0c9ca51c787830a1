"""Ingest input (issue 14, items 4, 5 first bullet, 6 second bullet, 7 "Holdout" and "Label
names"): JSON and JSONL manifests, decoding a large image within a memory bound, encrypted or
oddly compressed zip entries, a holdout that would leave a label untrained, and label names
(Unicode normalisation, a length limit). Each bad input is a clear error naming the file, from
the command line (a real `diffmine` process) and from the web form, and changes nothing."""
import io
import json
import re
import struct
import subprocess
import sys
import unicodedata

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.ingest import IngestError, ingest_dataset
from app.ingest.entries import MAX_LABEL_CHARS
from app.web import create_app
from tests.cli_helpers import run_diffmine
from tests.conftest import label_files, png_bytes, snapshot, write_folder, write_zip
from tests.web_helpers import form_token


@pytest.fixture
def web(settings):
    """A client over an empty data directory."""
    return TestClient(create_app(settings))


def upload(client, content: bytes, filename: str, **fields):
    return client.post("/upload", data=dict(csrf_token=form_token(client), **fields),
                       files={"file": (filename, content, "application/octet-stream")})


def ingest_cli(settings, source, *args) -> subprocess.CompletedProcess:
    return run_diffmine(settings.home_dir, "ingest", str(source), "--min-per-label", "3", *args)


def refused_cli(settings, source, *args, match: str) -> str:
    """The command exits 1 with one readable line that matches (not a raw exception: the CLI
    prefixes those with their type, "RuntimeError: ..."), and nothing was written."""
    before = snapshot(settings)
    done = ingest_cli(settings, source, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr, done.stderr
    assert re.match(r"diffmine ingest: (?![A-Z]\w*(Error|Exception): )", last), last
    assert re.search(match, last), last
    assert snapshot(settings) == before
    return last


def labels_of(client, dataset_id: int) -> dict[str, dict[str, int]]:
    data = client.get(f"/datasets/{dataset_id}.json").json()
    return {s["name"]: {label["name"]: label["images"] for label in s["labels"]}
            for s in data["label_sets"]}


# --- JSON and JSONL manifests -------------------------------------------------------------
def photo_folder(tmp_path):
    """Six images in one flat folder: labels can only come from a manifest."""
    return write_folder(tmp_path / "photos", {f"{i}.png": png_bytes(i) for i in range(6)})


def manifest_rows(extra: list[dict] = ()) -> list[dict]:
    return [{"path": f"{i}.png", "kind": "cat" if i < 3 else "dog"} for i in range(6)] + list(extra)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_cli_manifest_by_path_is_read_as_json(settings, tmp_path, suffix):
    """`--manifest x.jsonl` / `x.json` outside the folder: parsed as JSONL / JSON, not as CSV."""
    folder = photo_folder(tmp_path)
    manifest = tmp_path / f"x{suffix}"
    if suffix == ".json":
        manifest.write_text(json.dumps(manifest_rows()))
    else:
        write_jsonl(manifest, manifest_rows())
    done = ingest_cli(settings, folder, "--manifest", str(manifest), "--name", "pets", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label_sets"] == {"kind": {"cat": 3, "dog": 3}}


def test_a_manifest_without_a_known_suffix_is_sniffed(settings, tmp_path):
    folder = photo_folder(tmp_path)
    manifest = write_jsonl(tmp_path / "labels.txt", manifest_rows())
    report = ingest_dataset(settings, source=str(folder), name="sniffed", manifest=str(manifest))
    assert report.label_sets == {"kind": {"cat": 3, "dog": 3}}


def test_cli_manifest_errors_name_the_manifest_and_say_folder(settings, tmp_path):
    folder = photo_folder(tmp_path)
    manifest = write_jsonl(tmp_path / "x.jsonl", manifest_rows([{"path": "ghost.png", "kind": "cat"}]))
    refused_cli(settings, folder, "--manifest", str(manifest),
                match=r"x\.jsonl: row 7: image 'ghost\.png' is not in the folder")
    (tmp_path / "bad.json").write_text('[{"path": "0.png", "kind": "cat"}, 3]')
    refused_cli(settings, folder, "--manifest", str(tmp_path / "bad.json"),
                match=r"bad\.json: row 2 is not a JSON object")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_web_json_manifest_for_a_server_folder(settings, web, tmp_path, suffix):
    from worker.runner import Worker

    folder = photo_folder(tmp_path)
    rows = manifest_rows()
    content = (json.dumps(rows) if suffix == ".json" else "\n".join(map(json.dumps, rows))).encode()
    response = upload(web, content, f"labels{suffix}", name="pets", server_path=str(folder))
    assert response.status_code == 200 and response.url.path == "/jobs/1", response.text
    assert Worker(settings).run_one()
    assert web.get("/jobs/1.json").json()["status"] == "succeeded"
    assert labels_of(web, 1) == {"kind": {"cat": 3, "dog": 3}}


def test_web_manifest_naming_a_missing_file_says_not_in_the_folder(settings, web, tmp_path):
    from worker.runner import Worker

    folder = photo_folder(tmp_path)
    rows = manifest_rows([{"path": "ghost.png", "kind": "cat"}])
    response = upload(web, "\n".join(map(json.dumps, rows)).encode(), "labels.jsonl", name="pets",
                      server_path=str(folder))
    assert response.url.path == "/jobs/1"
    before = snapshot(settings)[1]
    Worker(settings).run_one()
    job = web.get("/jobs/1.json").json()
    assert job["status"] == "failed"
    assert "labels.jsonl: row 7: image 'ghost.png' is not in the folder" in job["error"], job["error"]
    assert "upload" not in job["error"] and str(settings.staging_dir) not in job["error"]
    assert snapshot(settings)[1] <= before  # nothing new (the uploaded manifest is removed)


# --- a large image is decoded within a memory bound ---------------------------------------
PEAK_SCRIPT = """
import resource, sys
from app.cli import main
code = main(["ingest", sys.argv[1], "--name", "x", "--min-per-label", "1", "--home", sys.argv[2],
             "--json"])
try:  # this process's own high-water mark; ru_maxrss also counts the parent's, from before exec
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak * 1024, code)
"""


def peak_rss_of_ingest(zip_path, home) -> int:
    """Peak resident memory, in bytes, of a fresh process that ingests the zip (its own: this
    test process's memory, which holds the large image, must not count)."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(zip_path), str(home)],
                          capture_output=True, text=True, timeout=300, check=False)
    peak, code = done.stdout.split()[-2:]
    assert code == "0", done.stderr
    return int(peak)


@pytest.mark.parametrize(("mode", "bytes_per_pixel"), [("RGB", 4), ("RGBA", 8)])
def test_a_large_image_is_decoded_within_its_memory_bound(tmp_path, mode, bytes_per_pixel):
    """A 7,900 x 7,900 PNG (in a zip of a few KB): the ingest's peak memory above that of a tiny
    image stays within docs/security.md's bound per image, +25%: the decoded image (Pillow keeps
    a pixel of several bands in 4 bytes) and, unless it is RGB, its RGB copy. Before the fix,
    14 bytes a pixel for both (whole-image copies for the hash, the RGBA composite and the
    thumbnail)."""
    side = 7_900
    buffer = io.BytesIO()
    Image.new(mode, (side, side), (30, 60, 90, 200)[: len(mode)]).save(buffer, format="PNG")
    big = write_zip(tmp_path / "big.zip", {"a/big.png": buffer.getvalue(), "b/small.png": png_bytes(1)})
    small = write_zip(tmp_path / "small.zip", {"a/0.png": png_bytes(2), "b/1.png": png_bytes(3)})
    baseline = peak_rss_of_ingest(small, tmp_path / "home-small")
    peak = peak_rss_of_ingest(big, tmp_path / "home-big")
    bound = 1.25 * bytes_per_pixel * side * side
    assert peak - baseline < bound, (f"{(peak - baseline) / 2**20:.0f} MiB above the baseline, "
                                     f"bound {bound / 2**20:.0f} MiB")


def test_pixel_hash_and_thumbnail_are_unchanged(settings, tmp_path):
    """Decoding in strips gives the same pixel digest as hashing the whole RGB image at once,
    for every mode an upload may hold."""
    import hashlib

    from app.ingest.images import check_image, to_rgb

    images = {"rgb.png": Image.new("RGB", (300, 200), (10, 20, 30)),
              "l.png": Image.linear_gradient("L").resize((300, 700)),
              "la.png": Image.merge("LA", [Image.linear_gradient("L"), Image.radial_gradient("L")]),
              "rgba.png": Image.merge("RGBA", [Image.linear_gradient("L")] * 3 + [Image.radial_gradient("L")]),
              "p.gif": Image.linear_gradient("L").convert("P"),
              "cmyk.jpg": Image.new("CMYK", (300, 5000), (1, 2, 3, 4))}
    images["ptrans.png"] = images["p.gif"].copy()
    images["ptrans.png"].info["transparency"] = 7
    for name, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format={"png": "PNG", "gif": "GIF", "jpg": "JPEG"}[name.split(".")[1]])
        data = buffer.getvalue()
        whole = to_rgb(Image.open(io.BytesIO(data)))
        expected = hashlib.sha256(f"{whole.width}x{whole.height}:".encode() + whole.tobytes()).hexdigest()
        checked = check_image(data, path=name, max_pixels=10**8)
        assert checked.sha256 == expected, name
        assert checked.rgb.tobytes() == whole.tobytes(), name
    # Thumbnails as image.copy().thumbnail() made them, without the copy.
    from app.ingest.images import write_thumbnail

    for size in [(300, 200), (200, 300), (1000, 3), (3, 1000), (129, 128), (128, 128), (5000, 4999)]:
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        old = image.copy()
        old.thumbnail((128, 128), Image.Resampling.LANCZOS)
        write_thumbnail(image, tmp_path / "t.png", 128)
        expected = io.BytesIO()
        if max(size) <= 256:
            old.save(expected, format="PNG")
            assert (tmp_path / "t.png").read_bytes() == expected.getvalue(), size
        else:
            old.save(expected, format="JPEG", quality=88)
            assert (tmp_path / "t.jpg").read_bytes() == expected.getvalue(), size


# --- encrypted zip entries and unsupported compression ------------------------------------
def patched_zip(path, entry: str, *, flag_bits: int = 0, method: int | None = None):
    """A zip of two labels whose `entry` has the given flag bits set and/or compression method
    (both in its local header and in the central directory, as another zip tool writes them)."""
    write_zip(path, label_files({"a": 3, "b": 3}))
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    while data[central + 46: central + 46 + len(entry)] != entry.encode():
        central = data.find(b"PK\x01\x02", central + 1)
    local = struct.unpack_from("<I", data, central + 42)[0]
    for flags_at in (central + 8, local + 6):
        struct.pack_into("<H", data, flags_at, struct.unpack_from("<H", data, flags_at)[0] | flag_bits)
        if method is not None:
            struct.pack_into("<H", data, flags_at + 2, method)
    path.write_bytes(data)
    return path


BAD_ENTRIES = [
    pytest.param({"flag_bits": 0x1}, r"b/1\.png: .*encrypted", id="encrypted"),
    pytest.param({"method": 99}, r"b/1\.png: .*compression method 99", id="compression-99"),
]


@pytest.mark.parametrize(("patch", "match"), BAD_ENTRIES)
def test_cli_bad_zip_entry_is_a_clear_error(settings, tmp_path, patch, match):
    path = patched_zip(tmp_path / "odd.zip", "b/1.png", **patch)
    refused_cli(settings, path, match=match)


@pytest.mark.parametrize(("patch", "match"), BAD_ENTRIES)
def test_web_bad_zip_entry_is_a_400_naming_it(settings, web, tmp_path, patch, match):
    path = patched_zip(tmp_path / "odd.zip", "b/1.png", **patch)
    before = snapshot(settings)
    response = upload(web, path.read_bytes(), "odd.zip", name="odd")
    assert response.status_code == 400
    assert '<code class="bad-file">b/1.png</code>' in response.text
    answer = web.post("/upload.json", data={"csrf_token": form_token(web), "name": "odd"},
                      files={"file": ("odd.zip", path.read_bytes(), "application/zip")})
    assert answer.status_code == 400 and answer.json()["path"] == "b/1.png"
    assert re.search(match, "b/1.png: " + answer.json()["detail"]), answer.json()
    assert snapshot(settings)[0] == before[0]


# --- holdout ------------------------------------------------------------------------------
def test_holdout_leaving_a_label_untrained_is_refused(settings, tmp_path):
    """With 3 images of 'b', a holdout of 0.9 holds all three out: refuse, naming 'b'."""
    source = write_zip(tmp_path / "h.zip", label_files({"a": 10, "b": 3}))
    refused_cli(settings, source, "--holdout", "0.9",
                match=r"holdout fraction 0\.9 leaves label 'b' .*no training images")
    assert ingest_cli(settings, source, "--holdout", "0.5").returncode == 0


def test_web_holdout_leaving_a_label_untrained_is_a_400(settings, web, tmp_path):
    source = write_zip(tmp_path / "h.zip", label_files({"a": 10, "b": 3}))
    response = web.post("/upload.json", data={"csrf_token": form_token(web), "name": "h",
                                              "holdout": "0.9"},
                        files={"file": ("h.zip", source.read_bytes(), "application/zip")})
    assert response.status_code == 400 and "'b'" in response.json()["detail"]


# --- label names ----------------------------------------------------------------------------
def test_label_names_are_normalised_to_nfc(settings, tmp_path):
    """'café' spelled with a combining accent (NFD, as macOS writes file names) and precomposed
    (NFC) is one label, in folder names and in manifest cells alike."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    files = {f"{nfc}/{i}.png": png_bytes(i) for i in range(2)}
    files |= {f"{nfd}/{i}.png": png_bytes(10 + i) for i in range(2)}
    files |= {f"tea/{i}.png": png_bytes(20 + i) for i in range(3)}
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "f.zip", files)), name="folders")
    assert report.label_sets == {"label": {nfc: 4, "tea": 3}}

    images = {f"{i}.png": png_bytes(30 + i) for i in range(7)}
    rows = [f"{i}.png,{nfc if i < 2 else nfd if i < 4 else 'tea'}\n" for i in range(7)]
    images["manifest.csv"] = ("path,drink\n" + "".join(rows)).encode()
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "m.zip", images)), name="cells")
    assert report.label_sets == {"drink": {nfc: 4, "tea": 3}}


def test_label_names_over_the_limit_are_refused(settings, tmp_path):
    long = "x" * (MAX_LABEL_CHARS + 1)
    files = label_files({"a": 3, "b": 3}) | {f"{long}/{i}.png": png_bytes(40 + i) for i in range(3)}
    refused_cli(settings, write_zip(tmp_path / "l.zip", files),
                match=rf"{long}/0\.png: label 'x{{10,}}.*' is {MAX_LABEL_CHARS + 1} characters, "
                      rf"more than the limit of {MAX_LABEL_CHARS}")
    images = {f"{i}.png": png_bytes(50 + i) for i in range(6)}
    images["manifest.csv"] = ("path,kind\n" + "".join(
        f"{i}.png,{'short' if i < 3 else long}\n" for i in range(6))).encode()
    with pytest.raises(IngestError, match=rf"3\.png: label .* more than the limit of {MAX_LABEL_CHARS}"):
        ingest_dataset(settings, source=str(write_zip(tmp_path / "m.zip", images)), name="m")
    exactly = "y" * MAX_LABEL_CHARS
    files = label_files({"a": 3}) | {f"{exactly}/{i}.png": png_bytes(60 + i) for i in range(3)}
    report = ingest_dataset(settings, source=str(write_zip(tmp_path / "ok.zip", files)), name="ok")
    assert exactly in report.label_sets["label"]


def test_a_file_over_max_file_bytes_is_refused_unread(settings, tmp_path):
    """Each file is read into memory whole: one over the limit is refused from its size alone,
    in a zip (its header), in a folder and as a manifest given by path."""
    files = label_files({"a": 3, "b": 3}) | {"b/big.png": png_bytes(70) + b"\0" * 5_000}
    settings.max_file_bytes = 4_000
    before = snapshot(settings)
    for source in (write_zip(tmp_path / "z.zip", files), write_folder(tmp_path / "f", files)):
        with pytest.raises(IngestError, match=r"b/big\.png: file is \d+ bytes, more than the limit of 4000"):
            ingest_dataset(settings, source=str(source), name="big")
    manifest = write_jsonl(tmp_path / "m.jsonl", manifest_rows() * 40)
    with pytest.raises(IngestError, match=r"m\.jsonl: manifest is \d+ bytes, more than the limit"):
        ingest_dataset(settings, source=str(photo_folder(tmp_path)), name="m", manifest=str(manifest))
    assert snapshot(settings) == before
