"""Access token and CSRF: with a token every request needs it (login cookie or bearer header);
state-changing forms need the page's CSRF token, with or without an access token."""
import pytest
from fastapi.testclient import TestClient

from app.web import create_app
from app.web.security import AUTH_COOKIE
from tests.web_helpers import csrf_from, form_token

TOKEN = "s3cret-token-of-20ch"


@pytest.fixture
def locked(mined_settings):
    settings = mined_settings.model_copy(update={"token": TOKEN})
    return TestClient(create_app(settings))


def test_every_page_needs_the_token(locked):
    page = locked.get("/runs/1", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fruns%2F1"
    for url in ("/runs/1.json", "/files/runs/1/crops/x.png", "/openapi.json", "/heatmaps/1/1/1.png"):
        response = locked.get(url)
        assert response.status_code == 401, url
    assert locked.get("/static/style.css").status_code == 200
    assert locked.get("/login").status_code == 200
    wrong = locked.get("/runs/1.json", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_bearer_header(locked):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert locked.get("/runs/1.json", headers=headers).json()["id"] == 1
    # A bearer request needs no CSRF token: a browser never sends that header by itself.
    response = locked.post("/clusters/1/artifact.json", data={"artifact": "1"}, headers=headers)
    assert response.status_code == 200 and response.json()["is_artifact"]


def test_login_form_sets_a_cookie(locked):
    login = locked.get("/login?next=/runs/1")
    token = csrf_from(login.text)
    bad = locked.post("/login", data={"token": "guess", "next": "/runs/1", "csrf_token": token})
    assert bad.status_code == 401 and "not the access token" in bad.text
    good = locked.post("/login", data={"token": TOKEN, "next": "/runs/1", "csrf_token": token},
                       follow_redirects=False)
    assert good.status_code == 303 and good.headers["location"] == "/runs/1"
    assert AUTH_COOKIE in good.cookies
    assert TOKEN not in good.headers["set-cookie"]
    assert locked.get("/runs/1").status_code == 200
    offsite = locked.post("/login", data={"token": TOKEN, "next": "//evil.example/",
                                          "csrf_token": token}, follow_redirects=False)
    assert offsite.headers["location"] == "/"


def test_forms_need_the_csrf_token(locked):
    token = csrf_from(locked.get("/login").text)
    locked.post("/login", data={"token": TOKEN, "csrf_token": token})
    refused = locked.post("/clusters/1/artifact", data={"artifact": "1"})
    assert refused.status_code == 403
    forged = locked.post("/clusters/1/artifact", data={"artifact": "1", "csrf_token": "0" * 64})
    assert forged.status_code == 403
    page_token = form_token(locked, "/clusters/1")
    assert locked.post("/clusters/1/artifact", data={"artifact": "1",
                                                     "csrf_token": page_token}).status_code == 200
    # htmx sends it as a header (hx-headers on the body).
    assert f'"X-CSRF-Token": "{page_token}"' in locked.get("/clusters/1").text
    assert locked.post("/clusters/1/artifact", data={"artifact": "0"},
                       headers={"X-CSRF-Token": page_token}).status_code == 200


def test_without_a_token_browsers_still_need_csrf(mined_settings):
    client = TestClient(create_app(mined_settings))
    # A script (no cookie, no Origin) may post; a browser page from elsewhere may not.
    assert client.post("/clusters/1/artifact.json", data={"artifact": "1"}).status_code == 200
    cross_site = client.post("/clusters/1/artifact", data={"artifact": "1"},
                             headers={"Origin": "https://evil.example"})
    assert cross_site.status_code == 403
    token = form_token(client, "/clusters/1")
    assert client.post("/clusters/1/artifact", data={"artifact": "0", "csrf_token": token},
                       headers={"Origin": "http://testserver"}).status_code == 200
    upload = client.post("/upload", data={"name": "x"}, headers={"Origin": "https://evil.example"},
                         files={"file": ("a.zip", b"PK", "application/zip")})
    assert upload.status_code == 403
