"""Screenshots of the demo's pages for docs/demo.md, taken in Debian's chromium.

    python bench/demo_screenshots.py http://127.0.0.1:8000    # a server started by `make demo`

Writes docs/img/demo-run.png (category overview), demo-flags.png (the Flags gallery),
demo-year-<label>.png (a year gallery) and demo-year-trend.png (a year cluster's trend).
"""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "img"


def get_json(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path + ".json", timeout=30) as response:
        return json.load(response)


def runs_by_label_set(base: str) -> dict[str, dict]:
    """The ready demo runs, keyed by label set name."""
    dataset = next(d for d in get_json(base, "/")["datasets"] if d["name"] == "twemoji")
    runs = get_json(base, f"/datasets/{dataset['id']}")["runs"]
    return {r["label_set"]: r for r in runs if r["status"] == "ready"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the demo server's URL")
    parser.add_argument("--year", default="2019", help="the year whose gallery is shown")
    args = parser.parse_args()
    base = args.base.rstrip("/")
    from playwright.sync_api import sync_playwright

    runs = runs_by_label_set(base)
    category, year = runs["category"], runs["year"]
    year_run = get_json(base, f"/runs/{year['id']}")
    year_label = next(label for label in year_run["labels"] if label["name"] == args.year)
    flags = next(label for label in get_json(base, f"/runs/{category['id']}")["labels"] if label["name"] == "Flags")
    top = (year_label.get("top") or {}).get("id")
    pages = {"demo-run": f"/runs/{category['id']}",
             "demo-flags": f"/runs/{category['id']}/labels/{flags['id']}",
             f"demo-year-{args.year}": f"/runs/{year['id']}/labels/{year_label['id']}"}
    if top is not None:
        pages["demo-year-trend"] = f"/clusters/{top}"
    IMAGES.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for name, path in pages.items():
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(IMAGES / f"{name}.png"), full_page=False)
            print(f"{name}: {base}{path}")
        browser.close()


if __name__ == "__main__":
    main()
