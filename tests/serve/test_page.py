"""The service's page in headless Chromium: a query image picked in the page's file input finds
its class, a cluster gallery pages, a cluster is named, an image shows its neighbours. No console
error, no broken image. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json

import pytest

from semclust.demo import make_query_image
from tests.report.helpers import repo_root
from tests.serve.conftest import KNN_K
from tests.serve.server import Server

pytestmark = pytest.mark.slow

BROKEN_IMAGES = (
    "Array.from(document.images).filter(i => !i.hidden && i.complete && i.naturalWidth === 0)"
    ".map(i => i.src)"
)


def _images_loaded(selector: str) -> str:
    return (
        f"(() => {{ const ims = Array.from(document.querySelectorAll('{selector} img'));"
        " return ims.length > 0 && ims.every(i => i.complete && i.naturalWidth > 0); })()"
    )


def _cards(selector: str, key: str) -> str:
    return f"Array.from(document.querySelectorAll('{selector}')).map(c => c.dataset.{key})"


def test_the_page_searches_browses_and_names(run_copy, browser, tmp_path):
    artifacts = repo_root() / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    query = make_query_image(tmp_path / "query-chelsea.jpg", "chelsea", seed=5)
    logs = tmp_path / "logs"
    logs.mkdir()
    with Server(run_copy, logs) as server:
        browser.navigate(server.url + "/")
        assert browser.wait_for("document.getElementById('run-facts').textContent")
        assert "72 images" in browser.evaluate("document.getElementById('run-facts').textContent")

        # Pick the query image in the page's own file input, as a person does.
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", {"nodeId": root, "selector": "#query-file"})
        browser.call("DOM.setFileInputFiles", {"files": [str(query)], "nodeId": node["nodeId"]})
        assert browser.wait_for("document.querySelectorAll('#results .hit').length >= 5", 90)
        uris = browser.evaluate(_cards("#results .hit", "uri"))
        assert all("/chelsea/" in u for u in uris[:3]), uris
        assert browser.wait_for(_images_loaded("#results"))
        browser.screenshot(artifacts / "serve-search.png")

        # The clusters, then one cluster's gallery two images a page.
        browser.evaluate("location.hash = '#/clusters'")
        assert browser.wait_for("document.querySelectorAll('.cluster-card').length === 12")
        assert browser.wait_for(_images_loaded("#cluster-list"))
        browser.screenshot(artifacts / "serve-clusters.png")
        cluster = browser.evaluate(_cards(".cluster-card", "cluster"))[0]
        members = server.get(f"/clusters/{cluster}?limit=500").json()["members"]
        browser.evaluate(f"location.hash = '#/cluster/{cluster}?per=2'")
        seen = []
        for page in range(3):
            assert browser.wait_for(
                f"document.getElementById('status').textContent.includes('images {2 * page + 1}-')"
            )
            seen += browser.evaluate(_cards("#gallery .member", "imageId"))
            if page < 2:
                browser.evaluate("document.getElementById('gallery-pager-next').click()")
        assert seen == [m["image_ref"] for m in members[:6]]

        # Name it on the page: the service has the name, and the page says how to apply it.
        browser.evaluate(
            "(() => { document.getElementById('name-input').value = 'a cat <i>named</i>';"
            " document.getElementById('name-save').click(); })()"
        )
        assert browser.wait_for(
            "document.getElementById('name-status').textContent.includes('semclust label')"
        )
        assert server.get(f"/clusters/{cluster}").json()["name"] == "a cat <i>named</i>"
        assert browser.evaluate("document.querySelectorAll('#cluster-title i').length") == 0

        # An image and its neighbours from the kNN graph.
        first = seen[0]
        browser.evaluate(f"location.hash = '#/image/{first}'")
        assert browser.wait_for(f"document.querySelectorAll('#neighbors .hit').length === {KNN_K}")
        assert browser.wait_for(_images_loaded("#neighbors"))
        expected = [
            n["image_ref"] for n in server.get(f"/images/{first}/neighbors").json()["neighbors"]
        ]
        assert browser.evaluate(_cards("#neighbors .hit", "imageId")) == expected
        browser.screenshot(artifacts / "serve-neighbors.png")

        assert browser.evaluate(BROKEN_IMAGES) == []
        assert browser.problems() == []
    (artifacts / "serve-page.json").write_text(json.dumps({"top_hits": uris[:5]}) + "\n")
