"""The console at ``/`` in a real headless Chromium (Debian's package, driven by Playwright),
against a real gateway on each backend: the page loads with no failed request, no console
error and nothing from another origin; the models table, live charts, a typed review (label,
probabilities, the 20 slots with unknown words marked) and a drawn digit (the 28x28 the model
got, ten bars) agree with the API. ``make test`` installs Chromium where it can; where it
cannot, the browser tests are skipped with a message saying so."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from contract.repository import read_version
from testkit.gateway import gateway_processes, wait_until
from tests.serving.conftest import MODELS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root and on a closed network: no sandbox, no background calls to Google's hosts.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
CONSOLE = Path(__file__).resolve().parents[3] / "serving" / "console"
REVIEW = "A wonderful, moving film with brilliant acting, although the zorblaxian subplot drags."


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no Chromium on this machine (make test runs `apt-get install chromium`; it was not possible here)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


class Watched:
    """A page with everything that went wrong recorded: console errors, uncaught exceptions,
    failed requests, responses >= 400, and requests to any other origin."""

    def __init__(self, browser, origin: str, **context_options):
        self.context = browser.new_context(**{"viewport": {"width": 1280, "height": 1600}, **context_options})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.problems: list[str] = []
        self.urls: list[str] = []
        p = self.page
        p.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        p.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        p.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        p.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))
        p.on("request", lambda r: self.urls.append(r.url))
        self.origin = origin

    def foreign(self) -> list[str]:
        return [u for u in self.urls if not u.startswith((self.origin + "/", f"blob:{self.origin}/", "data:"))]

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, gw):
    w = Watched(browser, gw.rest)
    w.page.goto(gw.rest + "/")
    yield w
    w.close()


def api(gw, path, body):
    r = httpx.post(gw.rest + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_page_loads_models_and_live_charts(gw, page):
    p = page.page
    models = httpx.get(gw.rest + "/v1/models").json()["models"]
    rows = p.locator("#models tbody tr")
    rows.first.wait_for()
    assert rows.count() == sum(len(m["versions"]) for m in models)
    for m in models:
        for v in m["versions"]:
            row = p.locator(f'#models tr[data-model="{m["name"]}"][data-version="{v["version"]}"]')
            cells = row.locator("td").all_inner_texts()
            assert cells[2] == v["state"] and all(label in cells[3] for label in v["labels"])
            if "test_accuracy" in v["card"]:
                assert cells[4] == f'{100 * v["card"]["test_accuracy"]:.1f} %'
    # Traffic between scrapes, so every chart has a series for both models.
    for _ in range(3):
        api(gw, "/v1/sentiment:predict", {"texts": ["great film"] * 4})
        api(gw, "/v1/digits:predict", {"images": [[[0] * 28] * 28]})
        p.wait_for_timeout(1500)
    # (polled from here: the page's policy forbids evaluating strings, as Playwright's wait_for_function does)
    wait_until(lambda: int(p.locator("#chart-batch").get_attribute("data-points") or 0) >= 2
               and "digits p99" in p.locator("#chart-latency").get_attribute("data-series"), timeout=30, interval=0.5)
    assert "ok" in p.locator("#chart-rate").get_attribute("data-series").split(",")
    assert {"digits", "sentiment_lstm"} <= set(p.locator("#chart-queue").get_attribute("data-series").split(","))
    assert {"digits", "sentiment_lstm"} <= set(p.locator("#chart-batch").get_attribute("data-series").split(","))
    assert p.locator("#readiness").inner_text() == "ready"
    assert page.problems == [] and page.foreign() == []


@pytest.mark.parametrize("model,whole_text", [("sentiment_bilstm", False), ("sentiment_lstm", True)])
def test_typed_review_gets_a_label_and_highlighted_slots(gw, page, model, whole_text):
    p = page.page
    p.locator("#sentiment-model option").first.wait_for(state="attached")
    p.fill("#sentiment-text", REVIEW)
    p.select_option("#sentiment-model", model)
    if whole_text:
        p.check("#sentiment-whole")
    p.click("#sentiment-form button[type=submit]")
    p.locator("#sentiment-result").wait_for(state="visible")
    expected = api(gw, "/v1/sentiment:predict", {"texts": [REVIEW], "model": model, "explain": True, "whole_text": whole_text})
    pred = expected["predictions"][0]
    assert p.inner_text("#sentiment-label") == pred["label"]
    assert p.inner_text("#sentiment-score") == f'{pred["score"]:.3f}'
    slots = p.locator("#sentiment-slots .slot")
    assert slots.count() == 20
    prep = read_version(MODELS, model, expected["model"]["version"]).preprocessor
    kinds = {0: "pad", 1: "start", 2: "oov"}
    assert [(int(s.get_attribute("data-id")), s.inner_text(), s.get_attribute("data-kind")) for s in slots.all()] == [
        (i, t, kinds.get(i, "word")) for i, t in prep.explain(REVIEW)]
    unknown = p.locator("#sentiment-slots .slot.oov").all_inner_texts()
    assert unknown == [t for i, t in prep.explain(REVIEW) if i == 2] and "zorblaxian" in unknown
    assert p.eval_on_selector("#sentiment-slots .slot.oov", "e => getComputedStyle(e).backgroundColor") != \
        p.eval_on_selector("#sentiment-slots .slot.word", "e => getComputedStyle(e).backgroundColor")
    rows = p.locator("#sentiment-windows tbody tr")
    assert p.locator("#sentiment-windows").is_visible() == whole_text
    assert rows.count() == (pred["windows"] if whole_text else 0)
    assert page.problems == [] and page.foreign() == []


def stroke(page, points: list[tuple[float, float]], finger: bool) -> None:
    """Draw through ``points`` with the mouse, or with a finger (touch events through the
    DevTools protocol: Chromium turns them into touch pointer events, as on a phone)."""
    if not finger:
        page.mouse.move(*points[0])
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(x, y)
        page.mouse.up()
        return
    cdp = page.context.new_cdp_session(page)
    for kind, (x, y) in [("touchStart", points[0])] + [("touchMove", pt) for pt in points[1:]]:
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


@pytest.mark.parametrize("finger", [False, True], ids=["mouse", "finger"])
def test_drawn_digit_is_classified(gw, browser, finger):
    # The finger on a phone-sized, scrollable page: without touch-action none the stroke would scroll it.
    phone = {"has_touch": True, "is_mobile": True, "viewport": {"width": 390, "height": 700}} if finger else {}
    page = Watched(browser, gw.rest, **phone)
    p = page.page
    p.goto(gw.rest + "/")
    p.locator("#digits-version option").first.wait_for(state="attached")
    p.locator("#digit-pad").scroll_into_view_if_needed()
    box = p.locator("#digit-pad").bounding_box()
    x = box["x"] + box["width"] * 0.5
    # A vertical stroke: a one.
    stroke(p, [(x + i * 0.4, box["y"] + box["height"] * (0.15 + 0.7 * i / 20)) for i in range(21)], finger)
    p.locator("#digit-result").wait_for(state="visible")
    png = base64.b64decode(p.eval_on_selector("#digit-pad", "c => c.toDataURL('image/png').split(',')[1]"))
    expected = api(gw, "/v1/digits:predict", {"images_b64": [base64.b64encode(png).decode()], "explain": True})
    pred = expected["predictions"][0]
    assert p.inner_text("#digit-label") == str(pred["label"]) == "1"
    assert p.locator("#digit-bars .bar").count() == 10
    shown = p.eval_on_selector("#digit-seen", "c => Array.from(c.getContext('2d').getImageData(0, 0, 28, 28).data)")
    assert shown[0::4] == [max(0, min(255, round(v))) for row in pred["image"] for v in row]  # the model's 28x28
    assert max(shown[0::4]) > 200 and sum(v > 100 for v in shown[0::4]) > 20  # a stroke, not an empty image
    p.click("#digit-clear")
    assert not p.locator("#digit-result").is_visible()
    assert page.problems == [] and page.foreign() == []
    page.close()


def test_models_table_fits_a_phone(gw, browser, tmp_path):
    """At 390 px (a phone) the models table is one card per version, each value beside its column's
    name: nothing is wider than the screen and nothing scrolls sideways (the 10-column table
    scrolled off-screen). A full-page screenshot is as wide as the screen."""
    page = Watched(browser, gw.rest, viewport={"width": 390, "height": 800}, is_mobile=True, has_touch=True)
    try:
        p = page.page
        p.goto(gw.rest + "/")
        p.locator("#models tbody tr").first.wait_for()
        shot = tmp_path / "console-390.png"
        p.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        width = int.from_bytes(shot.read_bytes()[16:20], "big")  # the PNG's IHDR width
        assert width == 390, width
        section = p.locator("#models-section")
        assert section.evaluate("s => s.scrollWidth <= s.clientWidth"), "the models section scrolls sideways"
        for cell in p.locator("#models tbody td").all():
            box = cell.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (cell.inner_text(), box)
        first = p.locator("#models tbody tr").first.locator("td")
        assert first.nth(0).get_attribute("data-label") == "model"
        assert first.nth(4).get_attribute("data-label") == "test accuracy"
        assert page.problems == []
    finally:
        page.close()


def test_page_and_assets_are_served_from_the_package(gw):
    for path, kind in [("/", "text/html"), ("/console/console.js", "text/javascript"), ("/console/console.css", "text/css")]:
        r = httpx.get(gw.rest + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(gw.rest + "/console/config.json").json() == {"api_keys": False}
    # (encoded: a client would normalise "/console/../" away before sending it)
    assert httpx.get(gw.rest + "/console/..%2Fsettings.py").status_code == 404
    # Query parameters choose neither the file nor its type.
    js = httpx.get(gw.rest + "/console/console.js")
    for query in ("name=../api/rest/console.py", "name=/etc/passwd", "media_type=text/html", "path=/etc/passwd"):
        r = httpx.get(gw.rest + "/console/console.js?" + query)
        assert (r.status_code, r.headers["content-type"], r.content) == (200, js.headers["content-type"], js.content), query
    for f in CONSOLE.iterdir():  # nothing fetched from elsewhere
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


CONFIG = """model_config_list {
  config {
    name: "sentiment_lstm"
    base_path: "/models/sentiment_lstm"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 4 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 4 }
  }
}
"""


def write(path, text: str) -> None:
    """As scripts/rollout.sh does: a temporary file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def own_gateways(tmp_path_factory):
    """The gateways of this module's own settings, started together (their start-ups overlap): one
    with API keys, one reading a models.config of its own (``config``, for a test to change), one
    with the console switched off."""
    folder = tmp_path_factory.mktemp("console")
    config = folder / "models.config"
    config.write_text(CONFIG)
    with gateway_processes(dict(api_keys="console-key-1"), dict(models_config_file=config, models='["sentiment_lstm"]', models_config_poll_s=0.2),
                           dict(console="false")) as (keyed, configured, off):
        configured.config, configured.traffic = config, folder / "traffic.json"
        yield {"keyed": keyed, "configured": configured, "off": off}


@pytest.fixture(scope="module")
def keyed(own_gateways):
    return own_gateways["keyed"]


def test_console_asks_for_the_api_key_when_keys_are_on(browser, keyed):
    assert httpx.get(keyed.rest + "/v1/models").status_code == 401
    assert httpx.get(keyed.rest + "/console/config.json").json() == {"api_keys": True}
    w = Watched(browser, keyed.rest)
    try:
        p = w.page
        p.goto(keyed.rest + "/")
        p.locator("#key-form").wait_for(state="visible")
        assert "API key" in p.inner_text("#message")
        assert not any("/v1/models" in u for u in w.urls)  # nothing asked before there is a key
        p.fill("#api-key", "console-key-1")
        p.click("#key-form button[type=submit]")
        p.locator("#models tbody tr").first.wait_for()
        p.fill("#sentiment-text", "a truly awful film")
        p.click("#sentiment-form button[type=submit]")
        p.locator("#sentiment-result").wait_for(state="visible")
        assert p.inner_text("#sentiment-label") in ("negative", "positive")
        assert w.problems == [] and w.foreign() == []
    finally:
        w.close()


def test_models_table_follows_a_label_move_and_shows_the_traffic_split(browser, own_gateways):
    """Promoting a version in models.config (no restart) and splitting traffic show in the open console."""
    gw = own_gateways["configured"]
    w = Watched(browser, gw.rest)
    try:
        p = w.page
        p.goto(gw.rest + "/")
        chips = lambda version: p.locator(  # noqa: E731
            f'#models tr[data-model="sentiment_lstm"][data-version="{version}"] .label-chip')
        chips(4).first.wait_for()
        assert chips(4).all_inner_texts() == ["canary"] and chips(1).all_inner_texts() == ["stable", "default"]
        write(gw.traffic, '{"sentiment_lstm": {"canary_percent": 25, "shadow_percent": 10}}')
        wait_until(lambda: chips(4).all_inner_texts() == ["canary", "25% of traffic", "shadow 10%"], timeout=30, interval=0.5)
        assert chips(1).all_inner_texts() == ["stable", "default", "75% of traffic"]
        write(gw.config, CONFIG.replace('key: "stable" value: 1', 'key: "stable" value: 4'))  # promote
        wait_until(lambda: chips(4).all_inner_texts() == ["canary", "stable", "default"], timeout=30, interval=0.5)
        assert chips(1).all_inner_texts() == []
        assert w.problems == []
    finally:
        write(gw.traffic, "{}")
        write(gw.config, CONFIG)
        w.close()


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_render_from_the_gateway_alone(gw, browser, path):
    """Swagger UI and ReDoc in the browser: nothing fetched from another host (ReDoc's footer
    logo came from cdn.redoc.ly), no console error, no schema warning (ReDoc warned
    "Incompatible types in allOf" for DigitsRequest)."""
    w = Watched(browser, gw.rest)
    warnings = []
    w.page.on("console", lambda m: m.type == "warning" and warnings.append(m.text))
    try:
        w.page.goto(gw.rest + path)
        w.page.get_by_text("/v1/digits:predict").first.wait_for()
        w.page.wait_for_timeout(500)
        assert w.foreign() == [] and w.problems == [] and warnings == []
    finally:
        w.close()


def test_api_docs_are_public_with_keys_on_and_offer_the_key_schemes(keyed):
    """docs_public (default): the docs pages, their assets and the OpenAPI document need no key;
    the document says which operations need one and how to send it."""
    for path in ["/docs", "/redoc", "/openapi.json", "/redoc/redoc.standalone.js",
                 "/static-offline-docs/swagger-ui-bundle.js"]:
        assert httpx.get(keyed.rest + path, timeout=30).status_code == 200, path
    assert httpx.get(keyed.rest + "/v1/models").status_code == 401
    doc = httpx.get(keyed.rest + "/openapi.json").json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert doc["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert doc["paths"]["/v1/sentiment:predict"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_console_can_be_switched_off(own_gateways):
    off = own_gateways["off"]
    assert httpx.get(off.rest + "/").status_code == 404
    assert httpx.get(off.rest + "/console/console.js").status_code == 404


def test_every_console_file_is_packaged():
    """pyproject's package-data takes every file of serving/console/ into the wheel."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((CONSOLE.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["serving"]
    files = sorted(f.relative_to(CONSOLE.parent).as_posix() for f in CONSOLE.iterdir())
    assert files and all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files), (files, patterns)
