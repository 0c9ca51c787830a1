"""The login form (when an access token is set) and the API index."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from app.web.deps import CSRF, SettingsDep, render, wants_json
from app.web.security import AUTH_COOKIE, SESSION_SECONDS, client_of, retry_after, safe_next, token_matches

router = APIRouter(tags=["auth"])


@router.get("/login", summary="The login form")
def login_page(request: Request, settings: SettingsDep, next: str = "/"):
    data = {"token_required": bool(settings.token), "next": safe_next(next)}
    return render(request, "login.html", {"data": data, "error": None})


@router.post("/login", dependencies=CSRF, summary="Log in with the access token (form field 'token'); "
             "failed attempts are throttled per client (429)")
async def login(request: Request, settings: SettingsDep):
    form = await request.form()
    target = safe_next(form.get("next"))
    if not settings.token:
        return RedirectResponse(target, status_code=303)
    guard, client = request.app.state.login_guard, client_of(request.scope)
    data = {"token_required": True, "next": target}
    wait = guard.throttle.wait(client)
    if wait:
        message = f"Too many failed attempts: try again in {retry_after(wait)} s."
        return render(request, "login.html", {"data": data, "error": message}, status_code=429,
                      headers={"Retry-After": retry_after(wait)})
    if not token_matches(settings.token, str(form.get("token") or "")):
        guard.throttle.failed(client)
        return render(request, "login.html", {"data": data, "error": "That is not the access token."},
                      status_code=401)
    guard.throttle.succeeded(client)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(AUTH_COOKIE, guard.new_cookie(), httponly=True, samesite="lax",
                        max_age=SESSION_SECONDS, secure=request.url.scheme == "https")
    return response


@router.post("/logout", dependencies=CSRF,
             summary="Log out: the login cookie is revoked, and no longer works even if replayed")
def logout(request: Request):
    request.app.state.login_guard.log_out(request.cookies.get(AUTH_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(AUTH_COOKIE, httponly=True, samesite="lax",
                           secure=request.url.scheme == "https")
    return response


@router.get("/api", summary="The HTTP API: every route, from the OpenAPI schema")
def api_page(request: Request):
    schema = request.app.openapi()
    routes = [{"method": method.upper(), "path": path, "summary": op.get("summary", ""),
               "tags": op.get("tags", [])}
              for path, ops in schema["paths"].items() for method, op in ops.items()]
    data = {"openapi": "/openapi.json", "routes": routes}
    if wants_json(request):
        return data
    return render(request, "api.html", {"data": data})
