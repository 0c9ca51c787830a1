"""Access token and CSRF protection.

* Access token (`Settings.token`, env DIFFMINE_TOKEN). When set, every request but the login
  page and /static needs it: an `Authorization: Bearer TOKEN` header, or the signed cookie the
  login form sets. Pages answer a redirect to /login, API calls (JSON, non-GET) a 401.
* CSRF: every state-changing request made with a browser's cookies carries a token that only
  diffmine can make: a random nonce in a cookie (`diffmine_csrf`), and in the form field
  `csrf_token` or the header `X-CSRF-Token` its HMAC under a server secret (the access token, or
  a random secret kept in the data directory, so several server processes agree). A request
  authenticated by a bearer header needs no CSRF token (a browser never adds that header on its
  own), and neither does a request with no cookie, Origin or Sec-Fetch-Site header when no access
  token is set: that is a script (curl), which a web page cannot make a browser send.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path
from urllib.parse import quote

from starlette.types import ASGIApp, Receive, Scope, Send

from app.settings import Settings

AUTH_COOKIE = "diffmine_auth"
CSRF_COOKIE = "diffmine_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: Reachable without the token: the login form and the assets it needs.
OPEN_PREFIXES = ("/login", "/static/")
NONCE = re.compile(r"^[0-9a-f]{32}$")


def _sign(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def server_secret(settings: Settings) -> str:
    """The access token, or a random secret made once per data directory (`web-secret`, mode
    0600). It is written whole to a temporary file beside it and then linked into place, which
    never replaces an existing file: when several server processes start at once, the first
    link wins and every process reads that one secret; none ever reads a half-written file."""
    if settings.token:
        return settings.token
    path = settings.home_dir / "web-secret"
    secret = _read_secret(path)
    if secret:
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".web-secret-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            if not _read_secret(path):  # empty: left by a crash of an older, two-step version
                os.replace(temporary, path)
        except OSError:  # a file system without hard links: atomic still, last one wins
            os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def auth_cookie_value(token: str) -> str:
    return _sign(token, "diffmine-auth-v1")


def token_matches(token: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(token.encode(), given.encode())


def _cookies(raw: str) -> dict[str, str]:
    out = {}
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


class SecurityMiddleware:
    """Checks the access token and carries the CSRF nonce (a pure ASGI middleware: cheap)."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.token = settings.token
        self.secret = server_secret(settings)
        self.auth_cookie = auth_cookie_value(settings.token) if settings.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {}
        for key, value in scope["headers"]:
            if key in (b"cookie", b"authorization", b"accept", b"origin", b"sec-fetch-site"):
                headers[key] = value.decode("latin-1")
        cookies = _cookies(headers.get(b"cookie", ""))
        nonce = cookies.get(CSRF_COOKIE)
        state = scope.setdefault("state", {})
        state["csrf_secret"] = self.secret
        state["csrf_nonce"] = nonce if nonce and NONCE.match(nonce) else None
        bearer = headers.get(b"authorization", "")
        bearer = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
        state["bearer"] = bool(self.token and token_matches(self.token, bearer))
        state["browser"] = bool(cookies or b"origin" in headers or b"sec-fetch-site" in headers)
        state["token_required"] = bool(self.token)
        if self.token and not state["bearer"] and not scope["path"].startswith(OPEN_PREFIXES):
            if not hmac.compare_digest(cookies.get(AUTH_COOKIE, "").encode(), self.auth_cookie.encode()):
                await self._refuse(scope, headers, send)
                return

        async def send_with_cookie(message):
            if message["type"] == "http.response.start" and state.get("csrf_new"):
                cookie = (f"{CSRF_COOKIE}={state['csrf_nonce']}; Path=/; HttpOnly; "
                          f"SameSite=Lax")
                message = dict(message, headers=list(message.get("headers", [])) +
                               [(b"set-cookie", cookie.encode())])
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def _refuse(self, scope: Scope, headers: dict, send: Send) -> None:
        wants_page = (scope["method"] == "GET" and "text/html" in headers.get(b"accept", "")
                      and not scope["path"].endswith(".json"))
        if wants_page:
            target = scope["path"] + (("?" + scope["query_string"].decode("latin-1"))
                                      if scope.get("query_string") else "")
            location = "/login?next=" + quote(target, safe="")
            start = {"type": "http.response.start", "status": 303,
                     "headers": [(b"location", location.encode()), (b"content-length", b"0")]}
            body = b""
        else:
            body = b'{"detail":"an access token is needed: send Authorization: Bearer TOKEN"}'
            start = {"type": "http.response.start", "status": 401,
                     "headers": [(b"content-type", b"application/json"),
                                 (b"www-authenticate", b"Bearer"),
                                 (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})


def csrf_token(request) -> str:
    """The token this request's page puts in its forms (a nonce cookie is set when missing)."""
    state = request.state
    nonce = getattr(state, "csrf_nonce", None)
    if not nonce:
        nonce = secrets.token_hex(16)
        state.csrf_nonce, state.csrf_new = nonce, True
    return _sign(state.csrf_secret, "csrf:" + nonce)


def csrf_ok(request, submitted: str | None) -> bool:
    state = request.state
    if getattr(state, "bearer", False):
        return True
    if not getattr(state, "token_required", False) and not getattr(state, "browser", True):
        return True
    nonce = getattr(state, "csrf_nonce", None)
    if not nonce or not submitted or getattr(state, "csrf_new", False):
        return False
    return hmac.compare_digest(_sign(state.csrf_secret, "csrf:" + nonce).encode(), submitted.encode())


def safe_next(target: str | None) -> str:
    """Only local paths: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
