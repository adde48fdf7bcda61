"""serve.html in a real headless Chromium (Debian's `chromium` package), driven by Playwright, against a real
`python serve.py`. .ci/run installs the browser; without it this test fails, saying so, rather than skip."""

import os
import re
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from inference import Predictor
from test_serve import best_checkpoint, start_server  # noqa: F401 (best_checkpoint is a fixture)

pytestmark = pytest.mark.slow  # a real browser (Debian's Chromium): the fast tier leaves it to CI

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download is never used (it needs the internet): this is the system's browser.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# docs/serve.png is this test's screenshot on a real model:
#   SERVE_CHECKPOINT=logs/cola/version_0 SERVE_SCREENSHOT=docs/serve.png python -m pytest tests/test_page.py
SCREENSHOT = os.environ.get("SERVE_SCREENSHOT")  # default: a temporary folder
CHECKPOINT = os.environ.get("SERVE_CHECKPOINT")  # default: the tiny test model


@pytest.fixture(scope="module")
def served_checkpoint(best_checkpoint) -> Path:  # noqa: F811
    return Path(CHECKPOINT) if CHECKPOINT else best_checkpoint


@pytest.fixture(scope="module")
def server(served_checkpoint) -> Iterator[str]:
    """A real `python serve.py` of served_checkpoint: its URL."""
    process, url = start_server(served_checkpoint, "--max_chars", "200")
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's browser with `apt-get install chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_page_shows_a_label_and_probability_per_sentence(served_checkpoint, server, browser, tmp_path):
    sentences = ["The dog sat on the mat.", "Mat the on sat dog the."]
    expected = Predictor(served_checkpoint).predict(sentences)
    health = httpx.get(f"{server}/health").json()
    page = browser.new_page(viewport={"width": 420, "height": 640})  # a phone's width
    page.goto(server)
    box = page.get_by_label("Sentences, one per line")
    box.fill("\n".join(sentences))
    page.get_by_role("button", name="Check").click()
    results = page.locator("#results li")
    expect(results).to_have_count(2)
    for result, want in zip([results.nth(0), results.nth(1)], expected):
        expect(result.locator(".sentence")).to_have_text(want["sentence"])
        expect(result.locator(".label")).to_have_text(want["label"])
        expect(result.locator(".probability")).to_have_text(f"{100 * want['probabilities'][want['label']]:.1f}%")
    # From /health: the run folder and file name, and the start of its sha256; never the server's path.
    expect(page.locator("footer")).to_contain_text(f"{health['checkpoint']} (sha256 {health['sha256']}")
    expect(page.locator("footer")).not_to_contain_text(str(served_checkpoint.resolve().parent))
    page.screenshot(path=SCREENSHOT or tmp_path / "serve.png", full_page=True)

    # Errors show in the page: the server's (a 413, sent with Ctrl+Enter) and the page's own.
    box.fill("A dog " * 50)
    box.press("Control+Enter")
    expect(page.get_by_role("alert")).to_have_text("sentences[0] has 299 characters: at most 200")
    expect(results).to_have_count(0)
    box.fill("  \n")
    box.press("Control+Enter")
    expect(page.get_by_role("alert")).to_have_text("Type a sentence first, one per line.")


@pytest.fixture(scope="module")
def pair_server(tmp_path_factory, tiny_model_dir) -> Iterator[str]:
    """A real `python serve.py` of a tiny model of pairs (RTE's layout, test_tasks.py's data): its URL."""
    from conftest import run_train
    from test_tasks import data_dir_of, task_args

    workdir = tmp_path_factory.mktemp("page-rte")
    result = run_train(workdir, *task_args("rte", tiny_model_dir, data_dir_of(tmp_path_factory, "rte")), "--trainer.max_epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    process, url = start_server(workdir / "logs/rte/version_0")
    yield url
    process.terminate()
    process.wait(timeout=60)


def test_page_of_a_pair_model_takes_two_texts_and_shows_its_labels(pair_server, browser):
    page = browser.new_page()
    page.goto(pair_server)
    expect(page.get_by_role("heading")).to_have_text("Classify: rte")
    expect(page.locator("#about")).to_contain_text("one of: entailment, not_entailment")
    page.get_by_label("First texts (sentence1), one per line").fill("The dog sat.\nA boy ran.")
    page.get_by_label("Second texts, one per line").fill("A dog sat.\nThe cat sat.")
    page.get_by_role("button", name="Check").click()
    results = page.locator("#results li")
    expect(results).to_have_count(2)
    expect(results.nth(1).locator(".sentence")).to_have_text("A boy ran.  |  The cat sat.")
    expect(results.nth(0).locator(".label")).to_have_text(re.compile("^(entailment|not_entailment)$"))
    expect(page.locator("footer")).to_contain_text("validation accuracy")


def test_api_docs_render_with_the_network_off(server, browser):
    """/docs is Swagger UI: its scripts and styles come from this server, not a CDN, so it works offline.
    Every request that does not go to the loopback address is refused, as on a machine without a network."""
    page = browser.new_page()
    refused: list[str] = []

    def offline(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        refused.append(route.request.url)
        route.abort("internetdisconnected")

    page.route("**/*", offline)
    page.goto(f"{server}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("CoLA grammaticality")
    expect(page.locator(".opblock-summary-path", has_text="/predict")).to_be_visible()
    page.locator(".opblock-summary-path", has_text="/predict").click()  # the request body's example shows
    expect(page.locator(".opblock-body")).to_contain_text("sentences")
    assert refused == []
