"""The patch map and the label contrast in a real browser (Debian's chromium driven by
Playwright), against a real server over a real mined run (tests/mined.py). Screenshots go to
test-artifacts/; no page may log a console error (a Content-Security-Policy violation is one)."""
from __future__ import annotations

import json
import os
import urllib.request

import pytest

from tests.helpers import served, wait_until
from tests.mined import copy_mined_home
from tests.test_browser import ARTIFACTS, CHROMIUM, browser  # noqa: F401 (the browser fixture)

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("DIFFMINE_REQUIRE_BROWSER") != "1",
                                reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def server(mined_template, tmp_path_factory):
    home = copy_mined_home(mined_template, tmp_path_factory.mktemp("map-browser") / "home")
    with served(home, home.parent / "web.log") as base:
        yield base


def get_json(url: str):
    with urllib.request.urlopen(url) as response:
        return json.load(response)


@pytest.fixture
def page(browser):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.problems = []
    page.on("console", lambda m: page.problems.append(f"{m.type}: {m.text} at {page.url}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e} at {page.url}"))
    page.on("response", lambda r: page.problems.append(f"{r.status} for {r.url}") if r.status >= 400 else None)
    ARTIFACTS.mkdir(exist_ok=True)
    yield page
    page.close()


MAP = "document.querySelector('canvas.patch-map').patchMap"


def painted_share(page) -> float:
    """The share of the canvas's pixels that are not the white background."""
    return page.evaluate("""() => {
        const c = document.querySelector('canvas.patch-map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) painted++;
        return painted / (d.length / 4);
    }""")


def pixel_at(page, x: float, y: float) -> list[int]:
    return page.evaluate(f"""() => {{
        const c = document.querySelector('canvas.patch-map'), r = window.devicePixelRatio || 1;
        return Array.from(c.getContext('2d').getImageData(Math.round({x} * r), Math.round({y} * r), 1, 1).data);
    }}""")


def test_patch_map_draws_zooms_filters_and_opens_a_patch(server, page):
    from playwright.sync_api import expect

    everything = get_json(server + "/runs/1/map.json?limit=1000")
    points = everything["points"]
    page.goto(server + "/runs/1")
    page.click("text=Patch map")
    page.wait_for_url("**/runs/1/map")
    canvas = page.locator("canvas.patch-map")
    expect(canvas).to_have_attribute("data-shown", str(len(points)))
    # 200 patches: big enough on screen for thumbnails, whose atlas loads.
    expect(canvas).to_have_attribute("data-mode", "thumbnails")
    wait_until(lambda: page.evaluate(f"{MAP}.atlases[0] && {MAP}.atlases[0].ready && {MAP}.stats.draws > 1"),
               timeout=15, message="the thumbnail atlas to be drawn")
    assert page.evaluate(f"{MAP}.stats.firstDrawMs") > 0
    assert painted_share(page) > 0.03
    page.screenshot(path=str(ARTIFACTS / "map-01-thumbnails.png"))

    # Zoomed out, patches become dots; "Whole map" brings the first view back.
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(6):
        page.mouse.wheel(0, 300)
    expect(canvas).to_have_attribute("data-mode", "dots")
    assert painted_share(page) > 0.001
    page.screenshot(path=str(ARTIFACTS / "map-02-dots.png"))
    page.click(".map-reset")
    expect(canvas).to_have_attribute("data-mode", "thumbnails")

    # Dragging pans the map by the distance dragged.
    target = points[0]["patch"]
    before = page.evaluate(f"{MAP}.screenOf({target})")
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.down()
    page.mouse.move(box["x"] + 140, box["y"] + 90, steps=5)
    page.mouse.up()
    after = page.evaluate(f"{MAP}.screenOf({target})")
    assert after == pytest.approx([before[0] + 100, before[1] + 50], abs=0.5)
    page.click(".map-reset")

    # Filtered by a label: its patches only, the others as faint grey dots.
    page.select_option(".map-label", "3")
    ours = [p for p in points if p["label"] == 3]
    expect(canvas).to_have_attribute("data-shown", str(len(ours)))
    expect(page.locator(".map-legend li[data-label='3']")).to_have_class("current")
    scale, size = page.evaluate(f"[{MAP}.scale, {MAP}.size * {MAP}.scale]")
    apart = [p for p in points if p["label"] != 3 and all(
        max(abs(p["x"] - q["x"]), abs(p["y"] - q["y"])) * scale > size + 6 for q in ours)]
    assert apart, "every other patch overlaps a patch of label 3"
    spot = page.evaluate(f"{MAP}.screenOf({apart[0]['patch']})")
    assert pixel_at(page, *spot)[:3] == [0xd5, 0xd9, 0xde]
    page.screenshot(path=str(ARTIFACTS / "map-03-filtered.png"))
    page.click(".map-legend li[data-label='3']")  # the legend toggles the filter off
    expect(canvas).to_have_attribute("data-shown", str(len(points)))
    assert page.input_value(".map-label") == ""
    assert pixel_at(page, *spot)[:3] != [0xd5, 0xd9, 0xde]

    # A click on a patch opens its page.
    page.select_option(".map-label", "3")
    chosen = ours[len(ours) // 2]["patch"]
    x, y = page.evaluate(f"{MAP}.screenOf({chosen})")
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_url(f"**/patches/{chosen}")
    expect(page.locator("h1")).to_contain_text(f"Patch {chosen}")
    assert page.problems == [], page.problems


def test_compare_shows_the_label_contrast(server, page):
    from playwright.sync_api import expect

    page.goto(server + "/runs/1/compare?a=2&b=7")
    contrast = page.locator(".contrast")
    expect(contrast).to_have_count(2)
    expect(contrast.nth(0).locator("h3")).to_contain_text("Typical of Bird, not of Giraffe")
    expect(contrast.nth(1).locator("h3")).to_contain_text("Typical of Giraffe, not of Bird")
    for side in range(2):
        expect(contrast.nth(side).locator(".tile img")).to_have_count(14)
        values = [float(v) for v in contrast.nth(side).locator("figcaption").all_inner_texts()]
        assert values == sorted(values, reverse=True)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(ARTIFACTS / "map-04-contrast.png"), full_page=True)
    # Another left label: the page reloads with its contrast against the right one.
    page.select_option("select[name=a]", "4")
    expect(contrast.nth(0).locator("h3")).to_contain_text("Typical of Cow, not of Giraffe")
    first = get_json(server + "/runs/1/compare.json?a=4&b=7")["sides"][0]["contrast"]["patches"][0]
    page.click(".contrast >> nth=0 >> .tile >> nth=0")
    page.wait_for_url(f"**/patches/{first['id']}")
    assert page.problems == [], page.problems
