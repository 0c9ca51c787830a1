"""The web boundary (docs/security.md, "The web boundary"), against real `diffmine serve`
processes where the case is about the server: host names (DNS rebinding), serving without a
token, ports, the login (throttle, revocable cookies, Secure over https, only /login open) and
the security headers. Ids beyond SQLite's 64 bits, the run form's base weights and symlinks
planted after an in-place ingest go through the app itself."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.ingest import ingest_dataset
from app.models import Job
from app.settings import REPO_ROOT
from app.web import create_app
from tests.cli_helpers import run_diffmine
from tests.conftest import label_files, png_bytes, write_folder
from tests.helpers import free_port, wait_for_server
from tests.web_helpers import csrf_from, form_token

TOKEN = "a-token-of-24-characters"


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFMINE_")}
    return dict(env, OMP_NUM_THREADS="1", **extra)


@contextmanager
def serving(home: Path, *flags: str, host: str = "127.0.0.1", env: dict | None = None):
    """A real `diffmine serve` on a free port: yields (base URL, port, the log so far)."""
    port = free_port()
    log = home.parent / f"serve-{port}.log"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--home", str(home),
                                   "--host", host, "--port", str(port), *flags],
                                  env=env or clean_env(), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', 'localhost') else host}:{port}"
    try:
        wait_for_server(base, server, log=log)
        yield base, port, log
    finally:
        server.terminate()
        server.wait(timeout=30)


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=10, **kwargs)


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=30, **kwargs)


def count_jobs(home: Path) -> int:
    from app.settings import Settings

    with session_scope(Settings(home=home)) as session:
        return session.query(Job).count()


# --- host names (DNS rebinding) ----------------------------------------------------------------
def test_a_server_answers_only_to_its_own_host_names(tmp_path):
    folder = write_folder(tmp_path / "photos", label_files({"cat": 3, "dog": 3}))
    home = tmp_path / "home"
    env = clean_env(DIFFMINE_ALLOWED_HOSTS="Diffmine.LAN, other.example:8080")
    with serving(home, host="127.0.0.2", env=env) as (base, port, _):
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example",
                     "localhost.attacker.example", "diffmine.lan.attacker.example", "[::2]"):
            page = get(base + "/", headers={"Host": host})
            assert page.status_code == 400, host
            assert "DIFFMINE_ALLOWED_HOSTS" in page.text and "csrf_token" not in page.text
        # The rebinding attack's POST: a server-folder ingest queued from another site's page.
        refused = post(base + "/upload.json", headers={"Host": f"attacker.example:{port}"},
                       data={"name": "stolen", "server_path": str(folder)})
        assert refused.status_code == 400
        assert count_jobs(home) == 0
        # What this server is called: loopback names, its --host, DIFFMINE_ALLOWED_HOSTS (any
        # case, with or without the port; a name given with a port counts without it).
        for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LocalHost",
                     f"[::1]:{port}", "[::1]", f"127.0.0.2:{port}", "diffmine.lan",
                     f"DIFFMINE.lan:{port}", "other.example"):
            assert get(base + "/", headers={"Host": host}).status_code == 200, host
        queued = post(base + "/upload.json", headers={"Host": f"localhost:{port}"},
                      data={"name": "mine", "server_path": str(folder)})
        assert queued.status_code == 200 and "job" in queued.json()
        assert count_jobs(home) == 1
        # No Host header at all (HTTP/1.0): refused too.
        with socket.create_connection(("127.0.0.2", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert raw.recv(64).startswith(b"HTTP/1.1 400")


def test_a_star_turns_the_host_check_off(tmp_path):
    with serving(tmp_path / "home", env=clean_env(DIFFMINE_ALLOWED_HOSTS="*")) as (base, _, _):
        assert get(base + "/", headers={"Host": "anything.example"}).status_code == 200


def test_no_non_loopback_address_without_a_token_unless_allowed(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    refused = run_diffmine(home, "serve", "--host", "0.0.0.0", "--port", str(port),
                           env=clean_env(), timeout=60)
    assert refused.returncode == 1
    assert "refusing to serve on 0.0.0.0 without an access token" in refused.stderr
    assert "--allow-no-token" in refused.stderr and "Traceback" not in refused.stderr
    with pytest.raises(httpx.ConnectError):
        get(f"http://127.0.0.1:{port}/")
    # Allowed explicitly (flag or setting): it serves, says which names it answers to, and
    # still refuses other host names.
    for flags, env in ((["--allow-no-token"], clean_env()),
                       ([], clean_env(DIFFMINE_ALLOW_NO_TOKEN="1"))):
        with serving(home, *flags, host="0.0.0.0", env=env) as (base, port, log):
            assert get(base + "/").status_code == 200
            assert get(base + "/", headers={"Host": "attacker.example"}).status_code == 400
            assert "Answering to the host names 127.0.0.1, [::1], localhost" in log.read_text()
    # With a token, no flag is needed.
    with serving(home, host="0.0.0.0", env=clean_env(DIFFMINE_TOKEN=TOKEN)) as (base, _, _):
        assert get(base + "/.json").status_code == 401
        assert get(base + "/.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# --- ports and tokens: settings refused before anything starts -------------------------------
@pytest.mark.parametrize("flags,env", [
    (["--port", "99999"], {}), (["--port", "0"], {}), (["--port", "-1"], {}),
    ([], {"DIFFMINE_PORT": "65536"}),
])
def test_ports_outside_1_to_65535_are_refused(tmp_path, flags, env):
    done = run_diffmine(tmp_path / "home", "serve", *flags, env=clean_env(**env), timeout=60)
    assert done.returncode == 1, done.stderr
    assert "bad setting port (DIFFMINE_PORT or --port): a port is between 1 and 65535" in done.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was made


@pytest.mark.parametrize("flags,env", [(["--token", "short-token"], {}),
                                       ([], {"DIFFMINE_TOKEN": "fifteen-chars15"})])
def test_tokens_under_16_characters_are_refused(tmp_path, flags, env):
    done = run_diffmine(tmp_path / "home", "serve", "--port", str(free_port()), *flags,
                        env=clean_env(**env), timeout=60)
    assert done.returncode == 1
    assert "bad setting token (DIFFMINE_TOKEN or --token): the access token has" in done.stderr
    assert "fewer than 16" in done.stderr and "secrets.token_urlsafe" in done.stderr


# --- the login ------------------------------------------------------------------------------
def login(base: str, **headers) -> httpx.Response:
    page = get(base + "/login", headers=headers)
    nonce = page.cookies["diffmine_csrf"]
    return post(base + "/login", headers=dict(headers, Cookie=f"diffmine_csrf={nonce}"),
                data={"token": TOKEN, "next": "/", "csrf_token": csrf_from(page.text)})


def auth_cookie(response: httpx.Response) -> str:
    return re.search(r"diffmine_auth=([^;]+)", response.headers["set-cookie"]).group(1)


def test_logout_revokes_the_cookie_in_every_server_process(tmp_path):
    env = clean_env(DIFFMINE_TOKEN=TOKEN)
    with serving(tmp_path / "home", "--processes", "2", env=env) as (base, _, _):
        done = login(base)
        assert done.status_code == 303
        cookie = auth_cookie(done)
        assert "Secure" not in done.headers["set-cookie"]  # plain http
        session = {"Cookie": f"diffmine_auth={cookie}"}
        for _ in range(6):  # whichever process answers
            assert get(base + "/.json", headers=session).status_code == 200
        page = get(base + "/", headers=session)
        nonce = page.cookies["diffmine_csrf"]
        out = post(base + "/logout", data={"csrf_token": csrf_from(page.text)},
                   headers={"Cookie": f"diffmine_auth={cookie}; diffmine_csrf={nonce}"})
        assert out.status_code == 303 and 'diffmine_auth=""' in out.headers["set-cookie"]
        for _ in range(6):  # replayed after logout: refused by both processes
            assert get(base + "/.json", headers=session).status_code == 401
        assert get(base + "/", headers=dict(session, Accept="text/html")).status_code == 303
        # A forged session (a nonce never signed) opens nothing either.
        issued, nonce_part, signature = cookie.split(".")
        forged = f"{issued}.{'0' * 32}.{signature}"
        assert get(base + "/.json", headers={"Cookie": f"diffmine_auth={forged}"}).status_code == 401
        # Another login makes a new session that works.
        again = auth_cookie(login(base))
        assert again != cookie
        assert get(base + "/.json", headers={"Cookie": f"diffmine_auth={again}"}).status_code == 200


def test_failed_logins_are_throttled(tmp_path):
    with serving(tmp_path / "home", env=clean_env(DIFFMINE_TOKEN=TOKEN)) as (base, _, _):
        page = get(base + "/login")
        form = {"token": "wrong-wrong-wrong-wrong", "csrf_token": csrf_from(page.text)}
        headers = {"Cookie": f"diffmine_csrf={page.cookies['diffmine_csrf']}"}
        for _ in range(5):
            assert post(base + "/login", data=form, headers=headers).status_code == 401
        blocked = post(base + "/login", data=form, headers=headers)
        assert blocked.status_code == 429 and "Too many failed attempts" in blocked.text
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        # Even the right token waits: guessing does not go on at full speed.
        right = post(base + "/login", data=dict(form, token=TOKEN), headers=headers)
        assert right.status_code == 429
        # A wrong bearer token is a failed attempt too.
        assert get(base + "/.json", headers={"Authorization": "Bearer nope"}).status_code == 429

    with serving(tmp_path / "home2", env=clean_env(DIFFMINE_TOKEN=TOKEN)) as (base, _, _):
        for _ in range(5):
            assert get(base + "/.json", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert get(base + "/.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 429


def test_cookies_are_secure_over_https(tmp_path):
    # Behind a TLS proxy on this machine (uvicorn trusts X-Forwarded-Proto from 127.0.0.1).
    https = {"X-Forwarded-Proto": "https"}
    with serving(tmp_path / "home", env=clean_env(DIFFMINE_TOKEN=TOKEN)) as (base, _, _):
        page = get(base + "/login", headers=https)
        assert "; Secure" in page.headers["set-cookie"] and "diffmine_csrf=" in page.headers["set-cookie"]
        done = login(base, **https)
        assert done.status_code == 303
        assert "diffmine_auth=" in done.headers["set-cookie"] and "Secure" in done.headers["set-cookie"]
        assert "Secure" not in get(base + "/login").headers["set-cookie"]


def test_only_the_login_page_itself_is_open(tmp_path):
    with serving(tmp_path / "home", env=clean_env(DIFFMINE_TOKEN=TOKEN)) as (base, _, _):
        assert get(base + "/login").status_code == 200
        assert get(base + "/static/style.css").status_code == 200
        for path in ("/login-history", "/loginx", "/login/extra", "/logins.json"):
            assert get(base + path).status_code == 401, path


# --- security headers -------------------------------------------------------------------------
POLICY = ("default-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
          "frame-ancestors 'none'")


def test_every_response_carries_the_security_headers(tmp_path):
    with serving(tmp_path / "home") as (base, _, _):
        for response in (get(base + "/"), get(base + "/.json"), get(base + "/static/app.js"),
                         get(base + "/runs/1"), get(base + "/", headers={"Host": "evil.example"})):
            assert response.headers["content-security-policy"] == POLICY, response.url
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"


def test_templates_need_no_inline_script_or_style():
    """The policy refuses inline script, event handlers, javascript: URLs and style attributes:
    the pages carry none (geometry is data-style, set by static/app.js; tests/test_browser.py
    sees no violation in a real browser)."""
    inline = re.compile(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=|javascript:", re.I)
    for template in sorted((REPO_ROOT / "templates").glob("*.html")):
        found = inline.findall(template.read_text())
        assert not found, (template.name, found)


# --- ids beyond SQLite's 64-bit integers ------------------------------------------------------
def int_routes(app) -> list[tuple[str, str, list[str]]]:
    """(method, path, int parameter names) of every route with an int path parameter."""
    from starlette.convertors import IntegerConvertor

    def flat(routes):  # FastAPI >= 0.16x keeps included routers as routes of their own
        for route in routes:
            original = getattr(route, "original_router", None)
            yield from flat(original.routes) if original is not None else [route]

    found = []
    for route in flat(app.routes):
        names = [n for n, c in getattr(route, "param_convertors", {}).items()
                 if isinstance(c, IntegerConvertor)]
        for method in sorted(getattr(route, "methods", None) or ()):
            if names and method != "HEAD":
                found.append((method, route.path, names))
    return found


def test_ids_beyond_64_bits_are_404_on_every_route(settings):
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    routes = int_routes(client.app)
    assert len({path for _, path, _ in routes}) >= 19, routes
    for method, path, names in routes:
        for value in (2**63, 2**64, 10**30):
            for name in names:  # one id too large at a time, the others plain
                url = path
                for other in names:
                    url = url.replace(f"{{{other}:int}}", str(value if other == name else 1))
                for variant in (url, url + ".json") if method == "GET" else (url,):
                    response = client.request(method, variant)
                    assert response.status_code == 404, (method, variant, response.status_code)
    # The largest id SQLite holds is still just an id that names nothing.
    assert client.get(f"/runs/{2**63 - 1}.json").json()["detail"] == f"There is no run {2**63 - 1}."


def test_ids_and_offsets_in_query_strings_are_bounded_too(client):
    """Ids and offsets in query strings: beyond 64 bits a 422 naming the parameter, never a 500."""
    client = TestClient(client.app, raise_server_exceptions=False)
    for url in ("/images/1?run={}", "/images/1?label={}", "/runs/1?offset={}",
                "/runs/1/labels/1?offset={}", "/runs/1/compare?a={}", "/runs/1/compare?b={}",
                "/clusters/1?offset={}", "/patches/1/similar?label={}"):
        for value in (2**63, 2**64):
            response = client.get(url.format(value), headers={"Accept": "application/json"})
            assert response.status_code == 422, (url, response.status_code, response.text[:200])
            assert "9223372036854775807" in response.text
        assert client.get(url.format(1)).status_code == 200, url


# --- the run form's base weights --------------------------------------------------------------
@pytest.fixture
def one_dataset(settings, tmp_path):
    ingest_dataset(settings, source=str(write_folder(tmp_path / "src", label_files({"a": 3, "b": 3}))),
                   name="small")
    return settings


def start_run(client, **fields) -> httpx.Response:
    token = form_token(client, "/datasets/1")
    return client.post("/datasets/1/runs", data=dict(fields, csrf_token=token, steps="2"),
                       follow_redirects=False)


def pipeline_bases(settings) -> list:
    with session_scope(settings) as session:
        from app.models import TrainedModel

        return [m.config.get("base") for m in session.query(TrainedModel).order_by(TrainedModel.id)]


def test_the_run_form_takes_only_model_folders_of_the_data_directory(one_dataset, tmp_path):
    settings = one_dataset
    outside = tmp_path / "elsewhere" / "weights"
    outside.mkdir(parents=True)
    mine = settings.models_dir / "7" / "weights"
    mine.mkdir(parents=True)
    (settings.models_dir / "leak").symlink_to(outside)
    client = TestClient(create_app(settings))
    for base in ("/etc", str(outside), "../elsewhere/weights", "models/../../elsewhere/weights",
                 "models/leak", str(settings.models_dir), "runwayml/stable-diffusion-v1-5",
                 str(settings.home_dir)):
        for backend in ("pixel", "stable-diffusion"):
            refused = start_run(client, backend=backend, base=base)
            assert refused.status_code == 400, base
            assert "not allowed here" in refused.text and "DIFFMINE_ALLOWED_BASES" in refused.text
    missing = start_run(client, backend="pixel", base="models/8/weights")
    assert missing.status_code == 400 and "no such folder" in missing.text
    assert pipeline_bases(settings) == []
    # A model folder under the data directory: relative to it or absolute; kept absolute.
    for seed, base in enumerate(("models/7/weights", str(mine))):
        assert start_run(client, backend="pixel", base=base, seed=str(seed)).status_code == 303
    assert pipeline_bases(settings) == [str(mine), str(mine)]


def test_the_allowed_bases_setting_adds_folders_and_hub_ids(one_dataset, tmp_path):
    sd = tmp_path / "sd" / "stable-diffusion-v1-5"
    sd.mkdir(parents=True)
    settings = one_dataset.model_copy(update={
        "allowed_bases": f"{sd.parent}, runwayml/stable-diffusion-v1-5"})
    client = TestClient(create_app(settings))
    for base in (str(sd), "runwayml/stable-diffusion-v1-5"):
        assert start_run(client, backend="stable-diffusion", base=base).status_code == 303, base
    for base in ("runwayml/other-model", str(tmp_path)):
        assert start_run(client, backend="stable-diffusion", base=base).status_code == 400, base
    assert pipeline_bases(settings) == [str(sd), "runwayml/stable-diffusion-v1-5"]


# --- symlinks planted after an in-place ingest ------------------------------------------------
def test_in_place_images_are_served_only_from_their_root(settings, tmp_path):
    root = write_folder(tmp_path / "photos", label_files({"cat": 3, "dog": 3}))
    ingest_dataset(settings, source=str(root), name="photos", in_place=True)
    client = TestClient(create_app(settings))
    with session_scope(settings) as session:
        from app.models import Image

        paths = {Path(i.stored_path).relative_to(root.resolve()).as_posix(): i.id
                 for i in session.query(Image)}
    first, second = paths["cat/0.png"], paths["cat/1.png"]
    assert client.get(f"/images/{first}/original").content == (root / "cat/0.png").read_bytes()

    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(99))
    (root / "cat/0.png").unlink()
    (root / "cat/0.png").symlink_to(secret)  # planted after the ingest
    leaked = client.get(f"/images/{first}/original")
    assert leaked.status_code == 404 and leaked.content != secret.read_bytes()
    # A link that stays inside the root is still the dataset's own file.
    (root / "cat/1.png").unlink()
    (root / "cat/1.png").symlink_to(root / "dog/0.png")
    assert client.get(f"/images/{second}/original").content == (root / "dog/0.png").read_bytes()
    # The root itself swapped for a link to another folder with the same names.
    elsewhere = write_folder(tmp_path / "elsewhere", {"dog/2.png": png_bytes(98)})
    (root / "dog").rename(tmp_path / "dog-moved")
    (root / "dog").symlink_to(elsewhere / "dog")
    assert client.get(f"/images/{paths['dog/2.png']}/original").status_code == 404
    moved = tmp_path / "photos-moved"
    root.rename(moved)
    root.symlink_to(moved)
    assert client.get(f"/images/{paths['cat/2.png']}/original").status_code == 404
