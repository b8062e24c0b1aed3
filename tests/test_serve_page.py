"""`graft serve`'s page (graft/serve_page.html) in a real headless browser: Debian's Chromium
(/usr/bin/chromium, apt-get; nothing is downloaded) driven by Playwright, against the servers of
tests/test_serve.py. A VLM's page shows a random scene and, for an uploaded image and a typed
question, streams the answer `graft.api.Run.generate` gives; a dual encoder's page ranks typed
labels as POST /v1/graft/zero_shot does. Screenshots go to $GRAFT_TEST_ARTEFACTS (else tmp_path).
Skipped, saying why, without the playwright package or a chromium binary."""

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from graft.data.world_source import make_world
from tests.test_serve import dual, run, url, zero_shot  # noqa: F401 (fixtures: pytest finds them by name)

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives the browser")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("no chromium binary (apt-get install chromium)", allow_module_level=True)

WAIT = 30_000  # ms: a generous bound for a loaded CI machine, never a sleep
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that fails the test on any uncaught JavaScript error."""
    page = browser.new_page()
    page.set_default_timeout(WAIT)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    page.close()
    assert not errors, errors


def scene_png(run, index: int, folder: Path) -> tuple[Path, str]:
    """A test-split scene of the run's world as a PNG file, and one of its questions."""
    sample = make_world(run.cfg).sample("test", index)
    path = folder / f"scene{index}.png"
    sample.image.save(path)
    return path, sample.qa[0].question


def as_data_url(png: Path) -> str:
    """What the page's FileReader makes of the file."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("GRAFT_TEST_ARTEFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / name, full_page=True)


def test_vlm_page_streams_the_greedy_answer_of_generate(page, run, url, tmp_path):
    expect = sync_api.expect
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_text(run.dir.path.name, timeout=WAIT)
    expect(page.locator("#zeroshot")).to_be_hidden(timeout=WAIT)

    page.click("#scene")
    expect(page.locator("#drop img")).to_have_attribute("src", re.compile("^data:image/png;base64,"), timeout=WAIT)
    expect(page.locator("#prompt")).not_to_have_value("", timeout=WAIT)

    png, question = scene_png(run, 3, tmp_path)
    page.set_input_files("#file", png)
    expect(page.locator("#drop img")).to_have_attribute("src", as_data_url(png), timeout=WAIT)
    page.fill("#prompt", question)
    page.click("#ask")
    expect(page.locator("#answer")).to_have_attribute("aria-busy", "false", timeout=WAIT)

    # The page sends no max_tokens: the server's default is the context left after the prompt.
    room = run.cfg.lm.max_seq_len - len(run.processor.prompt(question))
    assert page.locator("#answer").get_attribute("class") != "error", page.locator("#answer").text_content()
    expected = run.generate(png, question, max_new_tokens=room)
    assert expected and page.locator("#answer").text_content() == expected
    screenshot(page, "serve_page_vlm.png", tmp_path)


def test_dual_encoder_page_ranks_labels_as_zero_shot_does(page, dual, tmp_path):
    expect = sync_api.expect
    run, address = dual
    page.goto(address + "/")
    expect(page.locator("#zeroshot")).to_be_visible(timeout=WAIT)
    expect(page.locator("#chat")).to_be_hidden(timeout=WAIT)

    png, _ = scene_png(run, 1, tmp_path)
    page.set_input_files("#file", png)
    expect(page.locator("#drop img")).to_have_attribute("src", as_data_url(png), timeout=WAIT)
    labels = ["red circle", "blue square", "green triangle", "yellow circle", "red square"]
    page.fill("#labels", "  " + "\n".join(labels[:3]) + "\n\n" + "\n".join(labels[3:]) + "\n")  # trimmed, blanks dropped
    page.click("#rank")
    expect(page.locator("#ranking")).to_have_attribute("aria-busy", "false", timeout=WAIT)

    assert page.locator("#ranking").get_attribute("class") != "error", page.locator("#ranking").text_content()
    rows = [[cell.text_content() for cell in row.locator("td").all()[:2]] for row in page.locator("#ranking tr").all()]
    status, got = zero_shot(address, model=run.dir.path.name, image_url={"url": as_data_url(png)}, labels=labels)
    assert status == 200
    assert rows == [[r["label"], f"{r['probability']:.3f}"] for r in got["labels"]]
    screenshot(page, "serve_page_dual.png", tmp_path)
