"""The draw-a-digit page (serving/web/index.html) in a real Chromium, against a real TorchServe.

    MNIST_DATA_DIR=../shared/mnist .venv/bin/python -m pytest -q tests/test_browser.py

The page comes from a static server of its own on a free loopback port, and TorchServe allows
exactly that origin (cors_allowed_origin), as config.properties allows `make demo`'s page. A second
static server on another port plays a page that is not allowed. Chromium is Debian's
(`make browser` installs it); Playwright only drives it: never `playwright install`.
"""
from __future__ import annotations

import json
import math
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from imaging import NOT_DIGITS
from repo import REPO_ROOT
from servers import launch_server, predictions_url
from serving.web import demo
from serving.server import server
from serving.server.properties import free_ports, read_properties
from serving.server.readiness import probe_image
from serving.handler.artifact import MODEL_NAME
from serving.handler.parsing import HTTP_STATUS

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The README's picture is refreshed only on request (`make screenshot` sets this variable):
# a test run writes nothing outside its temporary directories.
SCREENSHOT_ENV = "DIGITSERVE_SCREENSHOT"
MNIST_DIGITS_DRAWN = 50
REQUIRED_ACCURACY = 0.95


def ellipse(start_deg: float, end_deg: float, points: int = 16) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + (end_deg - start_deg) * i / (points - 1)) for i in range(points)]
    return [(0.5 + 0.22 * math.cos(a), 0.5 + 0.33 * math.sin(a)) for a in angles]


# Digits as a person draws them with a mouse: strokes of (x, y) points, 0-1 across the canvas.
DRAWN_DIGITS = {
    1: [[(0.52, 0.15), (0.48, 0.85)]],
    4: [[(0.36, 0.15), (0.28, 0.58), (0.74, 0.58)], [(0.62, 0.2), (0.62, 0.88)]],
    7: [[(0.26, 0.18), (0.74, 0.18)], [(0.74, 0.18), (0.44, 0.86)]],
    0: [ellipse(-90, 90), ellipse(90, 270)],
}


# --- Fixtures: two page origins, a TorchServe that allows one of them, Chromium -------------------
def serve_web_dir():
    """The page's directory on a free loopback port, served from a thread; yields its origin."""
    httpd = demo.static_server("127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def page_origin():
    yield from serve_web_dir()


@pytest.fixture(scope="module")
def other_origin():
    yield from serve_web_dir()


@pytest.fixture(scope="module")
def inference(tmp_path_factory, exported, page_origin):
    """A TorchServe of our own that allows page_origin, and only it."""
    address, _, run_dir, _ = launch_server(tmp_path_factory.mktemp("torchserve-cors"), exported,
                                           cors_allowed_origin=page_origin)
    yield address
    server.stop(run_dir)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, origin: str, inference: str):
    """(the page from origin talking to inference, the list its uncaught errors go to)."""
    context = browser.new_context(viewport={"width": 760, "height": 560})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{origin}/index.html?{urllib.parse.urlencode({'server': inference})}")
    page.wait_for_function("window.digitserve !== undefined")
    return page, errors


@pytest.fixture
def page(browser, page_origin, inference):
    page, errors = open_page(browser, page_origin, inference)
    yield page
    page.context.close()
    assert not errors, f"the page threw: {errors}"


# --- Helpers: draw as a person would, read what the page shows -------------------------------------
def draw(page, strokes) -> None:
    """Each stroke with the mouse: press, move through its points, release (the page predicts)."""
    box = page.locator("#canvas").bounding_box()

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * box["width"], box["y"] + y * box["height"]

    for stroke in strokes:
        page.mouse.move(*at(*stroke[0]))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*at(*point), steps=6)
        page.mouse.up()


def last_outcome(page) -> dict:
    """What the latest prediction (button, pen release or file) came to, once it is shown."""
    return page.evaluate("window.digitserve.lastPrediction")


def shown_digit(page) -> str:
    return page.text_content("#answer").strip()


def allow_origin_header(inference: str, origin: str) -> str | None:
    """Access-Control-Allow-Origin of the answer to a real prediction request from origin."""
    request = urllib.request.Request(predictions_url(inference), data=probe_image(), method="POST",
                                     headers={"Origin": origin, "Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert "digit" in json.loads(response.read())
        return response.headers.get("Access-Control-Allow-Origin")


# --- The page ------------------------------------------------------------------------------------
@pytest.mark.parametrize("digit", sorted(DRAWN_DIGITS))
def test_a_digit_drawn_with_the_mouse_is_recognized(page, digit):
    draw(page, DRAWN_DIGITS[digit])
    outcome = last_outcome(page)
    assert outcome["ok"], outcome
    assert shown_digit(page) == str(digit), f"drew {digit}, the page shows {shown_digit(page)}: {outcome}"
    assert page.text_content("#latency").endswith(" ms")
    top_bar = page.locator("#bars .bar.top .digit")
    assert top_bar.text_content() == str(digit)

    page.click("#clear")
    assert shown_digit(page) == "?"
    assert page.evaluate("""() => {
        const canvas = document.querySelector('#canvas');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        return pixels.every((value) => value === 255);
    }"""), "Clear left ink on the canvas"


def test_a_letter_is_not_a_digit_and_its_best_guess_is_greyed(page):
    draw(page, NOT_DIGITS["K"])
    outcome = last_outcome(page)
    assert outcome["ok"] and outcome["isDigit"] is False, outcome
    assert page.text_content("#message").startswith("That doesn't look like a digit")
    assert shown_digit(page) == str(outcome["digit"])     # the best guess stays, greyed
    greyed = "getComputedStyle(document.querySelector('#answer')).color"
    assert "guess" in page.get_attribute("#answer", "class") and page.evaluate(greyed) == "rgb(156, 163, 175)"

    page.click("#clear")
    draw(page, DRAWN_DIGITS[7])
    assert last_outcome(page)["isDigit"] is True and shown_digit(page) == "7"
    assert "guess" not in page.get_attribute("#answer", "class") and page.text_content("#message") == ""


def test_real_mnist_digits_painted_on_the_canvas(page, mnist_digits):
    images, labels = mnist_digits
    digits = images[:MNIST_DIGITS_DRAWN]
    height, width = digits.shape[1:]
    shown = page.evaluate("""async ({digits, width, height}) => {
        const shown = [];
        for (const pixels of digits) {
            window.digitserve.drawInkPixels(pixels, width, height);
            await window.digitserve.predict();
            shown.push(document.querySelector('#answer').textContent);
        }
        return shown;
    }""", {"digits": digits.reshape(len(digits), -1).tolist(), "width": width, "height": height})
    truth = [str(int(label)) for label in labels[:MNIST_DIGITS_DRAWN]]
    wrong = [(index, expected, got) for index, (expected, got) in enumerate(zip(truth, shown)) if expected != got]
    accuracy = 1 - len(wrong) / len(truth)
    assert accuracy >= REQUIRED_ACCURACY, f"{accuracy:.0%} shown correctly; (index, true, shown): {wrong}"


def test_predict_on_a_blank_canvas_asks_for_a_digit(page):
    page.click("#predict")
    outcome = last_outcome(page)
    assert outcome["code"] == "no_digit", outcome
    assert "Draw a digit first" in page.text_content("#message")
    assert not shown_digit(page).isdigit()


def test_a_file_is_sent_as_it_is(page):
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"}])
    outcome = last_outcome(page)
    assert outcome["code"] == "not_an_image", outcome
    assert page.text_content("#message") == page.evaluate("window.digitserve.messages.not_an_image")

    page.set_input_files("#file", files=[{"name": "one.png", "mimeType": "image/png", "buffer": probe_image()}])
    assert last_outcome(page)["ok"]
    assert shown_digit(page) == "1" and page.text_content("#source") == "one.png"
    assert page.text_content("#message") == ""


def test_the_page_knows_every_error_and_the_served_model(page, inference):
    messages = page.evaluate("window.digitserve.messages")
    assert set(HTTP_STATUS) <= set(messages), f"no sentence for {set(HTTP_STATUS) - set(messages)}"
    assert page.evaluate("window.digitserve.predictionsUrl") == predictions_url(inference)


def test_screenshot_of_an_answer_for_the_readme(page, tmp_path):
    draw(page, DRAWN_DIGITS[4])
    assert last_outcome(page)["ok"] and shown_digit(page) == "4"
    path = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "draw-a-digit.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_over_the_body_limit_gets_the_pages_own_sentence(page):
    """TorchServe refuses a body over max_request_size with a bare 413 and no CORS header, which
    the browser reports as a network failure; the page must say "too large" instead."""
    limit = int(read_properties(REPO_ROOT / "config.properties")["max_request_size"])
    big = probe_image() + bytes(limit)   # a valid PNG followed by padding: over the limit
    page.set_input_files("#file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}])
    outcome = last_outcome(page)
    assert outcome["code"] == "too_large", outcome
    assert page.text_content("#message") == page.evaluate("window.digitserve.messages.too_large")
    assert not shown_digit(page).isdigit()
    # The page holds the same limit as the server (config.properties max_request_size).
    assert page.evaluate("window.digitserve.maxRequestBytes") == limit


# --- CORS: only the allowed origin may read the answers -------------------------------------------
def test_a_page_from_an_origin_not_allowed_is_refused(browser, other_origin, inference):
    page, errors = open_page(browser, other_origin, inference)
    try:
        draw(page, DRAWN_DIGITS[1])
        outcome = last_outcome(page)
        assert outcome["code"] == "refused", outcome
        assert "refused the request" in page.text_content("#message")
        assert not shown_digit(page).isdigit()
        assert not errors, f"the page threw: {errors}"
    finally:
        page.context.close()


@pytest.mark.parametrize("elsewhere", ["https://drawings.example", "http://10.1.2.3:8080", "//drawings.example"])
def test_a_server_elsewhere_in_the_link_gets_no_drawing(browser, page_origin, elsewhere):
    """Issue 27 point 9: a link's ?server= may name this page's origin or this machine, nothing
    else: the page keeps its default server, says why, and sends nothing elsewhere."""
    page, errors = open_page(browser, page_origin, elsewhere)
    sent = []
    page.on("request", lambda request: sent.append(request.url))
    try:
        default = "http://127.0.0.1:8080"   # the page's DEFAULT_SERVER: config.properties' inference_address
        assert page.evaluate("window.digitserve.predictionsUrl") == f"{default}/predictions/{MODEL_NAME}"
        assert page.evaluate("window.digitserve.explanationsUrl") == f"{default}/explanations/{MODEL_NAME}"
        assert "neither this page's origin nor this machine" in page.text_content("#message")
        draw(page, DRAWN_DIGITS[1])
        last_outcome(page)
        assert not [url for url in sent if "drawings.example" in url or "10.1.2.3" in url], sent
        assert not errors, f"the page threw: {errors}"
    finally:
        page.context.close()


def test_the_server_allows_the_page_origin_and_no_other(inference, page_origin, other_origin):
    assert allow_origin_header(inference, page_origin) == page_origin
    # TorchServe 0.12 answers every request with its one configured origin, whatever the request's
    # Origin: another page is never named (nor "*"), so the browser withholds the answer from it.
    assert allow_origin_header(inference, other_origin) not in (other_origin, "*")


# --- make demo's page server ------------------------------------------------------------------------
def test_demo_serves_the_page_on_the_allowed_origin_and_stops(tmp_path):
    port = free_ports(1)[0]
    config = tmp_path / "config.properties"
    config.write_text(f"cors_allowed_origin=http://127.0.0.1:{port}\n")
    run_dir = tmp_path / "demo"
    url = demo.start(config, run_dir)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b'id="canvas"' in response.read()
        with pytest.raises(demo.DemoError, match="cannot serve the page"):
            demo.start(config, tmp_path / "second-demo")
    finally:
        assert demo.stop(run_dir)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    assert not demo.stop(run_dir), "a second stop found a server still running"


def test_demo_refuses_a_config_that_allows_no_origin(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("cors_allowed_origin=\n")
    with pytest.raises(demo.DemoError, match="names no http origin"):
        demo.start(config, tmp_path / "demo")


# --- Why? the explanation overlaid on the drawing --------------------------------------------------
OVERLAY_PIXELS = """() => {
    const drawing = document.querySelector('#canvas').getContext('2d').getImageData(0, 0, 280, 280).data;
    const overlay = document.querySelector('#overlay').getContext('2d').getImageData(0, 0, 280, 280).data;
    let painted = 0, onInk = 0;
    for (let i = 3; i < overlay.length; i += 4) {
        if (overlay[i] === 0) continue;
        painted++;
        if (drawing[i - 1] < 128) onInk++;   // the drawing is dark ink on white: blue channel
    }
    return { painted, onInk };
}"""


def test_why_overlays_the_map_on_the_strokes_of_the_drawing(page):
    overlay = page.locator("#overlay")
    assert not page.is_checked("#why")
    draw(page, DRAWN_DIGITS[7])
    assert last_outcome(page)["ok"] and shown_digit(page) == "7"
    assert overlay.is_hidden() and page.evaluate(OVERLAY_PIXELS)["painted"] == 0   # off by default

    page.check("#why")
    explanation = page.evaluate("window.digitserve.lastExplanation")
    assert explanation["ok"] and explanation["digit"] == 7, explanation
    assert overlay.is_visible()
    pixels = page.evaluate(OVERLAY_PIXELS)
    # The map is drawn where the handler took each input pixel from: mostly over the strokes.
    assert pixels["painted"] > 500 and pixels["onInk"] / pixels["painted"] >= 0.6, pixels

    page.click("#clear")
    assert overlay.is_hidden()
    draw(page, DRAWN_DIGITS[4])      # with Why? on, every drawing is explained after its answer
    assert last_outcome(page)["ok"] and overlay.is_visible()
    assert page.evaluate("window.digitserve.lastExplanation")["digit"] == 4
    page.uncheck("#why")
    assert overlay.is_hidden()
