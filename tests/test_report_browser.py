"""The report in a real browser: headless Chromium (the system's, Debian package ``chromium``) via Playwright.

Pages load from file:// with no console error, every heatmap renders, clicking a cell opens the
panel of that layer and head, and tokens, file and model names full of markup show as text with
no script running. Screenshots go to test-artifacts/.

The tests skip only when Chromium (or Playwright) is missing and HEADMAP_REQUIRE_BROWSER is not
set; CI (.ci/run) installs Chromium and sets it, so there they fail instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from synthetic_atlas import EVIL, EVIL_MODEL, make_atlas

from headmap import cli
from headmap.report import write_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def _chromium() -> str | None:
    env = os.environ.get("HEADMAP_CHROMIUM")
    for path in ((env,) if env else ()) + CHROMIUM_PATHS:
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def _unavailable(why: str):
    if os.environ.get("HEADMAP_REQUIRE_BROWSER"):
        pytest.fail(f"HEADMAP_REQUIRE_BROWSER is set but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        _unavailable("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, headless=True, args=args)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A loaded report page and everything it reported: console errors, page errors, dialogs."""

    def __init__(self, browser, html: Path) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.on(
            "console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("dialog", self._dialog)
        self.page.on(
            "request",
            lambda r: (
                None
                if r.url.startswith(("file:", "data:", "blob:"))
                else self.errors.append(f"network request: {r.url}")
            ),
        )
        self.page.goto(html.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def screenshot(self, name: str, full_page: bool = True) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)

    def clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.page.evaluate("typeof window.__pwned") == "undefined"


@pytest.fixture(scope="module")
def evil_report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evil") / "<img src=x onerror=alert(5)> 'run'"  # markup in the path too
    folder.mkdir()
    return write_report(make_atlas(), out=folder / "report.html")[0]


@pytest.fixture
def evil_page(browser, evil_report):
    page = Page(browser, evil_report)
    yield page
    page.page.close()


def heatmap_count(page) -> int:
    return page.evaluate("document.querySelectorAll('.heatmap').length")


def test_page_loads_and_every_heatmap_renders(evil_page):
    page = evil_page.page
    assert heatmap_count(page) == 7
    rendered = page.evaluate(
        """() => Array.from(document.querySelectorAll('.heatmap, #categories-plot')).map(d =>
             d.querySelector('svg.main-svg') !== null && d.querySelectorAll('.heatmaplayer image').length === 1
             && d.getBoundingClientRect().height > 100)"""
    )
    assert len(rendered) == 8 and all(rendered), rendered
    assert page.evaluate("document.querySelectorAll('#sinks-plot .scatterlayer .point').length") > 0
    assert page.evaluate("document.querySelectorAll('.tokens .tok').length") == 3 * 39
    assert page.locator("#top-tables table").count() == 6
    assert page.locator("#card tr").count() >= 10
    evil_page.screenshot("report-synthetic.png")
    evil_page.clean()


def test_injected_markup_renders_as_text_and_never_runs(evil_page):
    page = evil_page.page
    assert page.inner_text("#title") == EVIL_MODEL
    assert page.title() == f"headmap: {EVIL_MODEL}"
    strip = page.evaluate("document.getElementById('strip-0').textContent")
    for bad in EVIL:
        assert bad in strip, bad
    # only the page's own elements: no injected <img>, <svg onload>, <b> or extra <script>
    assert page.evaluate("document.scripts.length") == 3
    assert page.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert page.evaluate("document.querySelectorAll('#strips b, #strips script, #strips svg').length") == 0
    assert page.evaluate("Array.from(document.querySelectorAll('*')).some(e => e.hasAttribute('onerror') "
                         "|| e.hasAttribute('onload'))") is False  # fmt: skip
    # the sink chart's labels and the settings show the strings literally
    ticks = page.evaluate("Array.from(document.querySelectorAll('#sinks-plot .ytick text')).map(t => t.textContent)")
    assert any(EVIL[0] in t for t in ticks), ticks
    assert "<img src=x onerror=alert(2)>.txt" in page.inner_text("#settings")
    # hovering the evil token of the strip shows its title as text
    page.hover("#strip-0 .tok:nth-child(2)")
    evil_page.clean()


def test_clicking_a_cell_opens_that_heads_panel(evil_page):
    page = evil_page.page
    assert page.is_hidden("#head-panel")
    # a real mouse click in the middle of cell (layer 2, head 3) of the first heatmap
    page.locator("#heatmap-0").scroll_into_view_if_needed()
    point = page.evaluate(
        """() => {
             const gd = document.getElementById('heatmap-0');
             const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
             const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
             return [box.left + xa.l2p(3), box.top + ya.l2p(2)];
           }"""
    )
    page.mouse.click(point[0], point[1])
    page.wait_for_selector("#head-panel:not([hidden])")
    assert page.get_attribute("#head-panel", "data-layer") == "2"
    assert page.get_attribute("#head-panel", "data-head") == "3"
    assert page.inner_text("#panel-title") == "Layer 2, head 3"
    assert page.inner_text("#panel-kv") == "kv head 1 of 2"
    page.wait_for_function("document.querySelectorAll('#panel-maps .map .heatmaplayer image').length === 2")
    assert page.locator("#panel-scores tr").count() == 1 + 7
    evil_page.screenshot("report-synthetic-panel.png", full_page=False)
    # plotly's own click event on other heatmaps: the categories map and the last metric
    for div, layer, head in (("categories-plot", 0, 1), ("heatmap-6", 3, 0)):
        page.evaluate(
            "([id, l, h]) => document.getElementById(id).emit('plotly_click', {points: [{x: h, y: l}]})",
            [div, layer, head],
        )
        assert page.inner_text("#panel-title") == f"Layer {layer}, head {head}"
        assert page.get_attribute("#head-panel", "data-layer") == str(layer)
    page.evaluate("document.getElementById('categories-plot').emit('plotly_click', {points: [{x: 1, y: 0}]})")
    assert page.inner_text("#panel-tags").split()[0] == "sink"  # the planted sink head
    page.click("#panel-close")
    assert page.is_hidden("#head-panel")
    # a row of a top-heads table opens its head too
    page.click("#top-tables table:first-child tbody tr:first-child")
    assert page.inner_text("#panel-title") == "Layer 0, head 1"
    evil_page.clean()


def test_strip_measure_switches(evil_page):
    page = evil_page.page
    options = page.evaluate("Array.from(document.querySelectorAll('#strip-metric option')).map(o => o.value)")
    assert options == ["fai", "received", "sink_layers"]
    page.select_option("#strip-metric", "sink_layers")
    first = page.evaluate("getComputedStyle(document.querySelector('#strip-0 .tok')).backgroundColor")
    assert first.startswith("rgba(197, 48, 48") or first.startswith("rgb(197, 48, 48"), first
    evil_page.clean()


def test_report_without_tokens_or_maps(browser, tmp_path):
    path = write_report(make_atlas(tokens=False, map_samples=0, evil=False), out=tmp_path / "report.html")[0]
    page = Page(browser, path)
    assert heatmap_count(page.page) == 7
    page.page.evaluate("window.headmapReport.openPanel(1, 1)")
    assert "no attention map stored" in page.page.inner_text("#panel-maps")
    assert "no token-level measurement" in page.page.inner_text("#strips")
    page.clean()
    page.page.close()


def test_report_of_a_real_scan(browser, monkeypatch, capsys, tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(
        'the cat sat on the mat </script><script>window.__pwned=1</script> and "looked" at the door\n'
        "birds fly south in winter when the days grow short and cold\n"
    )
    out = tmp_path / "run"
    monkeypatch.setattr(
        sys, "argv", ["headmap", "scan", str(tiny_llama_dir), "--corpus", str(corpus), "--out", str(out),
                      "--no-progress", "--report"],
    )  # fmt: skip
    with pytest.raises(SystemExit) as info:
        cli.main()
        raise SystemExit(0)
    assert info.value.code in (0, None), capsys.readouterr().err
    page = Page(browser, out / "report.html")
    p = page.page
    assert heatmap_count(p) >= 5
    rendered = p.evaluate(
        "Array.from(document.querySelectorAll('.heatmap')).filter(d => d.querySelector('.heatmaplayer image')).length"
    )
    assert rendered == heatmap_count(p)
    p.evaluate("document.getElementById('heatmap-0').emit('plotly_click', {points: [{x: 2, y: 1}]})")
    assert p.inner_text("#panel-title") == "Layer 1, head 2"
    p.wait_for_function("document.querySelectorAll('#panel-maps .map .heatmaplayer image').length === 2")
    assert "script" in p.evaluate("document.getElementById('strip-0').textContent")
    page.screenshot("report-tiny-llama.png")
    page.clean()
    p.close()


def test_no_link_leaves_the_page(evil_page):
    """After every plot has shown its mode bar (hover) and a head panel is open: no src or href holds http."""
    page = evil_page.page
    for selector in ("#categories-plot", ".heatmap", "#sinks-plot"):
        for i in range(page.locator(selector).count()):
            box = page.locator(selector).nth(i)
            box.scroll_into_view_if_needed()
            box.hover()
    page.evaluate("window.headmapReport.openPanel(1, 1)")
    page.wait_for_function("document.querySelectorAll('#panel-maps .map .heatmaplayer image').length === 2")
    page.locator("#panel-maps .map").first.hover()
    assert page.evaluate("document.querySelectorAll('.modebar').length") >= 8
    links = page.evaluate(
        """() => Array.from(document.querySelectorAll('*')).flatMap(e => ['src', 'href', 'xlink:href']
             .map(a => e.getAttribute(a)).filter(v => v !== null))"""
    )
    assert links and not [v for v in links if "http" in v], [v for v in links if "http" in v]
    evil_page.clean()
