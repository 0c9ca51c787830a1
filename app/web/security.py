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
* Host names (DNS rebinding): a request whose Host header is not one this server answers to
  (127.0.0.1, localhost, [::1], the address it listens on, DIFFMINE_ALLOWED_HOSTS) is refused
  with a 400 before anything else runs: a site whose name rebinds to 127.0.0.1 reads nothing.
* Login: failed attempts (the form, or a wrong bearer token) are throttled per client; each
  login cookie is a random session signed with the token, which logout revokes for good (in the
  data directory, so every server process sees it); cookies are Secure over https.
* Every response carries a Content-Security-Policy allowing only this origin (no inline script
  or style, no framing), and X-Content-Type-Options: nosniff.

docs/security.md ("The web boundary") states the promises and their limits.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict, deque
from pathlib import Path
from urllib.parse import quote

from starlette.types import ASGIApp, Receive, Scope, Send

from app.settings import Settings

AUTH_COOKIE = "diffmine_auth"
CSRF_COOKIE = "diffmine_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: Reachable without the token: the login form itself, and the assets it needs.
OPEN_PATHS = ("/login",)
OPEN_PREFIXES = ("/static/",)
NONCE = re.compile(r"^[0-9a-f]{32}$")

#: Always answered to: this machine's own names.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: Failed logins (form or bearer) per client within LOGIN_WINDOW_S; more are answered 429.
LOGIN_ATTEMPTS = 5
LOGIN_WINDOW_S = 60.0
#: Clients whose failures are remembered at once (the oldest are forgotten first).
THROTTLE_CLIENTS = 10_000
#: A login cookie's life; after it, or after logout, the cookie no longer opens anything.
SESSION_SECONDS = 30 * 24 * 3600
LOGOUTS_FILE = "web-logouts"

#: Only this origin: no inline script or style, no eval, no framing, forms post only here.
CONTENT_SECURITY_POLICY = ("default-src 'self'; object-src 'none'; base-uri 'self'; "
                           "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"referrer-policy", b"same-origin"),
]


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


# --- host names -----------------------------------------------------------------------------
def host_name(value: str) -> str:
    """A host as a Host header names it: lower case, an IPv6 literal in brackets, no port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value.partition("]")[0] + "]"
    try:
        if isinstance(ipaddress.ip_address(value), ipaddress.IPv6Address):
            return f"[{value}]"
    except ValueError:
        pass
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() else value


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names this server answers to; None when DIFFMINE_ALLOWED_HOSTS is '*'."""
    extra = settings.extra_allowed_hosts
    if "*" in extra:
        return None
    names = {*LOOPBACK_HOSTS, host_name(settings.host), *(host_name(h) for h in extra)}
    return frozenset(names - {"0.0.0.0", "[::]", ""})  # listening everywhere names no host


def is_loopback(host: str) -> bool:
    name = host_name(host).strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _request_host(header: str | None) -> str | None:
    """The host name of a Host header, None when it is missing or malformed."""
    if not header:
        return None
    if header.startswith("["):
        name, bracket, rest = header.partition("]")
        if not bracket or rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return name.lower() + "]"
    name, colon, port = header.rpartition(":")
    if not colon:
        name = header
    elif not port.isdigit():
        return None
    return name.lower() or None


# --- login sessions and throttling -----------------------------------------------------------
class LoginThrottle:
    """Failed attempts per client (in this server process): at most LOGIN_ATTEMPTS within
    LOGIN_WINDOW_S, then refused until the oldest one leaves the window. Every request runs on
    the event loop, so no lock is needed."""

    def __init__(self, attempts: int = LOGIN_ATTEMPTS, window: float = LOGIN_WINDOW_S):
        self.attempts, self.window = attempts, window
        self.failures: OrderedDict[str, deque] = OrderedDict()

    def wait(self, client: str) -> float:
        """Seconds before `client` may try again (0: now)."""
        failures = self.failures.get(client)
        if not failures:
            return 0.0
        now = time.monotonic()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.attempts:
            return 0.0
        return failures[0] + self.window - now

    def failed(self, client: str) -> None:
        failures = self.failures.pop(client, None) or deque(maxlen=self.attempts)
        failures.append(time.monotonic())
        self.failures[client] = failures  # most recent last
        while len(self.failures) > THROTTLE_CLIENTS:
            self.failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


class Logouts:
    """Login sessions ended by logout, in the data directory (LOGOUTS_FILE: a line "nonce
    expiry" each, appended), so that every server process refuses a logged-out cookie. Read
    again whenever the file changes; lines past their expiry are ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: tuple[int, int] | None = None
        self.revoked: set[str] = set()

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self.seen, self.revoked = None, set()
            return
        if self.seen == (stat.st_mtime_ns, stat.st_size):
            return
        now, revoked = time.time(), set()
        for line in self.path.read_text().splitlines():
            nonce, _, expiry = line.partition(" ")
            if expiry.isdigit() and int(expiry) > now:
                revoked.add(nonce)
        self.seen, self.revoked = (stat.st_mtime_ns, stat.st_size), revoked

    def revoked_session(self, nonce: str) -> bool:
        self._reload()
        return nonce in self.revoked

    def revoke(self, nonce: str, expiry: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One short write with O_APPEND: concurrent logouts of several processes never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{nonce} {expiry}\n".encode())
        finally:
            os.close(fd)
        self.revoked.add(nonce)


class LoginGuard:
    """What the middleware and the login routes share: the token, the failure throttle and the
    ended sessions."""

    def __init__(self, settings: Settings):
        self.token = settings.token
        self.throttle = LoginThrottle()
        self.logouts = Logouts(settings.home_dir / LOGOUTS_FILE)

    def new_cookie(self) -> str:
        """A fresh login session: "issued.nonce.signature"."""
        issued, nonce = str(int(time.time())), secrets.token_hex(16)
        return f"{issued}.{nonce}.{self._signature(issued, nonce)}"

    def _signature(self, issued: str, nonce: str) -> str:
        return _sign(self.token, f"diffmine-auth-v2:{issued}:{nonce}")

    def session(self, cookie: str | None) -> tuple[str, int] | None:
        """(nonce, expiry) of a valid login cookie: signed with the token, not expired, not
        logged out; else None."""
        issued, _, rest = (cookie or "").partition(".")
        nonce, _, signature = rest.partition(".")
        if not (self.token and issued.isdigit() and NONCE.match(nonce)):
            return None
        if not hmac.compare_digest(self._signature(issued, nonce).encode(), signature.encode()):
            return None
        expiry = int(issued) + SESSION_SECONDS
        if expiry <= time.time() or self.logouts.revoked_session(nonce):
            return None
        return nonce, expiry

    def log_out(self, cookie: str | None) -> None:
        session = self.session(cookie)
        if session is not None:
            self.logouts.revoke(*session)


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


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
    """Checks the Host header and the access token, throttles failed logins, carries the CSRF
    nonce and adds the security headers (a pure ASGI middleware: cheap)."""

    def __init__(self, app: ASGIApp, settings: Settings, guard: LoginGuard):
        self.app = app
        self.token = settings.token
        self.secret = server_secret(settings)
        self.guard = guard
        self.hosts = allowed_hosts(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the app has no websockets; lifespan passes through
            await self.app(scope, receive, send)
            return
        headers = {}
        for key, value in scope["headers"]:
            if key in (b"cookie", b"authorization", b"accept", b"origin", b"sec-fetch-site", b"host"):
                headers[key] = value.decode("latin-1")
        state = scope.setdefault("state", {})

        async def send_secured(message):
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if state.get("csrf_new"):
                    secure = "; Secure" if scope.get("scheme") == "https" else ""
                    cookie = (f"{CSRF_COOKIE}={state['csrf_nonce']}; Path=/; HttpOnly; "
                              f"SameSite=Lax{secure}")
                    extra.append((b"set-cookie", cookie.encode()))
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        if self.hosts is not None and _request_host(headers.get(b"host")) not in self.hosts:
            await _answer(send_secured, 400, "text/plain; charset=utf-8",
                          b"This server does not answer to that host name. To reach it under "
                          b"another name, add the name to DIFFMINE_ALLOWED_HOSTS.")
            return
        cookies = _cookies(headers.get(b"cookie", ""))
        nonce = cookies.get(CSRF_COOKIE)
        state["csrf_secret"] = self.secret
        state["csrf_nonce"] = nonce if nonce and NONCE.match(nonce) else None
        bearer = headers.get(b"authorization", "")
        bearer = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
        state["browser"] = bool(cookies or b"origin" in headers or b"sec-fetch-site" in headers)
        state["token_required"] = bool(self.token)
        state["bearer"] = False
        if self.token and bearer is not None:
            client = client_of(scope)
            wait = self.guard.throttle.wait(client)
            if wait:
                await _too_many(send_secured, wait)
                return
            if token_matches(self.token, bearer):
                state["bearer"] = True
            else:
                self.guard.throttle.failed(client)
        path = scope["path"]
        open_path = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if self.token and not state["bearer"] and not open_path \
                and self.guard.session(cookies.get(AUTH_COOKIE)) is None:
            await self._refuse(scope, headers, send_secured)
            return
        await self.app(scope, receive, send_secured)

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


async def _answer(send: Send, status: int, content_type: str, body: bytes,
                  headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def retry_after(wait: float) -> str:
    return str(max(1, int(wait + 0.999)))


async def _too_many(send: Send, wait: float) -> None:
    body = (f'{{"detail":"too many failed logins from this address: try again in '
            f'{retry_after(wait)} s"}}').encode()
    await _answer(send, 429, "application/json", body,
                  [(b"retry-after", retry_after(wait).encode())])


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
