"""In a real browser (Debian's chromium, Playwright), a mined run's gallery and cluster pages say
how settled the ranking is: each cluster's stability, each patch's standard error."""
from __future__ import annotations

import os

import httpx
import pytest

from tests.helpers import served
from tests.test_browser import ARTIFACTS, CHROMIUM, browser  # noqa: F401 (the browser fixture)

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("DIFFMINE_REQUIRE_BROWSER") != "1",
                                reason="needs Debian's chromium")


@pytest.fixture
def mined_server(mined_settings, tmp_path):
    with served(mined_settings.home_dir, tmp_path / "web.log", OMP_NUM_THREADS="1") as base:
        yield base


def test_gallery_and_cluster_pages_show_how_settled_the_ranking_is(mined_server, browser):  # noqa: F811
    from playwright.sync_api import expect

    twin = httpx.get(f"{mined_server}/runs/1/labels/1.json").json()["clusters"]
    first = twin[0]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    expect.set_options(timeout=15_000)

    page.goto(f"{mined_server}/runs/1/labels/1")
    header = page.locator(f"#cluster-{first['id']} header")
    stability = header.locator(".stability")
    expect(stability).to_be_visible()
    expect(stability).to_have_text(f"stays {round(100 * first['stability'])}%")
    assert "new draws" in stability.get_attribute("title")
    tile = page.locator(f"#cluster-{first['id']} .tile").first
    member = first["members"][0]
    assert f"typicality {member['score']:.4g} ± " in tile.get_attribute("title")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "settled-gallery.png"))

    page.goto(f"{mined_server}/clusters/{first['id']}")
    expect(page.locator("p.settled")).to_contain_text(f"Stability {round(100 * first['stability'])}%")
    assert " ± " in page.locator(".members .tile").first.get_attribute("title")
    page.goto(f"{mined_server}/patches/{member['id']}")
    expect(page.get_by_text("standard error over the draws")).to_be_visible()
    assert problems == []
    page.close()
