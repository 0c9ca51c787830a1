"""The API: every route in OpenAPI, every page a JSON twin."""
import pytest

PAGES = ["/", "/datasets/1", "/runs/1", "/runs/1/labels/1", "/runs/1/compare", "/clusters/1",
         "/clusters/1/translations", "/images/1", "/patches/1", "/patches/1/similar", "/jobs",
         "/jobs/1", "/upload", "/api", "/runs/1/parallel"]


def test_openapi_lists_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/runs/{run_id}/labels/{label_id}", "/clusters/{cluster_id}/artifact",
                 "/patches/{patch_id}/similar", "/patches/{patch_id}/translate", "/upload",
                 "/jobs/{job_id}/cancel", "/images/{image_id}", "/translations/{translation_id}"):
        assert path in paths, path
    assert "/runs/{run_id}/labels/{label_id}" in client.get("/api").text


@pytest.mark.parametrize("url", PAGES)
def test_every_page_has_a_json_twin(client, url):
    html = client.get(url, headers={"Accept": "text/html"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    twin = client.get(url.rstrip("/") + ".json" if url != "/" else "/index.json")
    assert twin.status_code == 200 and twin.headers["content-type"] == "application/json"
    assert twin.json() == client.get(url, headers={"Accept": "application/json"}).json()
