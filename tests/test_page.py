"""serve.html in a real headless Chromium (Debian's `chromium` package), driven by Playwright, against a real
`python serve.py`. .ci/run installs the browser; without it this test fails, saying so, rather than skip."""

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from inference import ColaPredictor
from test_serve import best_checkpoint, start_server  # noqa: F401 (best_checkpoint is a fixture)

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


def test_page_shows_a_label_and_probability_per_sentence(best_checkpoint, tmp_path):  # noqa: F811
    if CHECKPOINT:
        best_checkpoint = Path(CHECKPOINT)
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's browser with `apt-get install chromium`")
    sentences = ["The dog sat on the mat.", "Mat the on sat dog the."]
    expected = ColaPredictor(best_checkpoint).predict(sentences)
    process, url = start_server(best_checkpoint, "--max_chars", "200")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 420, "height": 640})  # a phone's width
            page.goto(url)
            box = page.get_by_label("Sentences, one per line")
            box.fill("\n".join(sentences))
            page.get_by_role("button", name="Check").click()
            results = page.locator("#results li")
            expect(results).to_have_count(2)
            for result, want in zip([results.nth(0), results.nth(1)], expected):
                expect(result.locator(".sentence")).to_have_text(want["sentence"])
                expect(result.locator(".label")).to_have_text(want["label"])
                expect(result.locator(".probability")).to_have_text(f"{100 * want['probabilities'][want['label']]:.1f}%")
            expect(page.locator("footer")).to_contain_text(str(best_checkpoint))  # from /health
            page.screenshot(path=SCREENSHOT or tmp_path / "serve.png", full_page=True)

            # Errors show in the page: the server's (a 413, sent with Ctrl+Enter) and the page's own.
            box.fill("A dog " * 50)
            box.press("Control+Enter")
            expect(page.get_by_role("alert")).to_have_text("sentences[0] has 299 characters: at most 200")
            expect(results).to_have_count(0)
            box.fill("  \n")
            box.press("Control+Enter")
            expect(page.get_by_role("alert")).to_have_text("Type a sentence first, one per line.")
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=60)
