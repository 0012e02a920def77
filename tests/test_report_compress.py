"""The compress section of the report: the numbers of compress.json, in `headmap compress` and `headmap report`.

See docs/compress.md.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest
from cli_runner import assert_only_error_line
from cli_runner import run as run_cli
from synthetic_atlas import make_atlas

from headmap.report import report_html
from headmap.report.compress import check_compress, compress_report_html, load_compress

SUMMARY = {
    "model": "tiny <b>model</b>",
    "task": "needle:lengths=1024",
    "summary": [
        {"press": "full", "ratio": 0.0, "n": 12, "accuracy": 0.75, "low": 0.5, "high": 1.0,
         "cache_bytes": 1048576.0, "prefill_s": 0.25, "decode_s_per_token": 0.0125},
        {"press": "snapkv:window=8", "ratio": 0.5, "n": 12, "accuracy": 0.5833333333333334, "low": 0.3333333333333333,
         "high": 0.8333333333333334, "cache_bytes": 524288.0, "prefill_s": 0.3125, "decode_s_per_token": 0.01},
        {"press": "<script>alert(1)</script>", "ratio": 0.75, "n": 12, "accuracy": 0.25, "low": 0.0, "high": 0.5,
         "cache_bytes": 262144.0, "prefill_s": 0.2, "decode_s_per_token": float("nan")},
    ],
}  # fmt: skip


class _Table(HTMLParser):
    """Rows of the compress table: per cell, its text and attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, dict]]] = []
        self.head: list[str] = []
        self.images: list[dict] = []
        self.scripts = 0
        self._in_table = self._in_cell = False
        self._attrs: dict = {}
        self._text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "compress-table":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._in_cell, self._attrs, self._text = True, attrs, ""
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif self._in_cell and tag in ("td", "th"):
            self._in_cell = False
            if tag == "th":
                self.head.append(self._text)
            else:
                self.rows[-1].append((self._text, self._attrs))

    def handle_data(self, data):
        if self._in_cell:
            self._text += data


def parse(page: str) -> _Table:
    table = _Table()
    table.feed(page)
    table.rows = [r for r in table.rows if r]
    return table


def assert_numbers_of(page: str, summary: dict) -> None:
    """Every row of the page's compress table holds the numbers of ``summary`` (exactly, and as shown)."""
    table = parse(page)
    assert table.head[:9] == [
        "press", "ratio (fraction removed)", "items", "accuracy (fraction correct)", "95% interval", "cache (MiB)",
        "cache / full", "prefill (s)", "decode (ms/token)",
    ]  # fmt: skip
    rows = summary["summary"]
    assert len(table.rows) == len(rows)
    full = next(s for s in rows if s["press"] == "full")
    for cells, s in zip(table.rows, rows, strict=True):
        text = [c[0] for c in cells]
        value = [c[1].get("data-value") for c in cells]
        assert text[0] == s["press"]
        assert float(value[1]) == s["ratio"] and text[1] == f"{s['ratio']:.2f}"
        assert int(value[2]) == s["n"]
        assert float(value[3]) == s["accuracy"] and text[3] == f"{s['accuracy']:.3f}"
        assert float(cells[4][1]["data-low"]) == s["low"] and float(cells[4][1]["data-high"]) == s["high"]
        assert text[4] == f"[{s['low']:.3f}, {s['high']:.3f}]"
        assert float(value[5]) == s["cache_bytes"] and text[5] == f"{s['cache_bytes'] / 2**20:.3f}"
        assert float(value[6]) == s["cache_bytes"] / full["cache_bytes"]
        assert float(value[7]) == s["prefill_s"] and text[7] == f"{s['prefill_s']:.3f}"
        if s["decode_s_per_token"] == s["decode_s_per_token"]:  # not NaN
            assert float(value[8]) == s["decode_s_per_token"]
            assert text[8] == f"{1000 * s['decode_s_per_token']:.1f}"
        else:
            assert text[8] == "n/a" and value[8] is None
    plots = [img for img in table.images if img.get("id") == "compress-plot"]
    assert len(plots) == 1 and plots[0]["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(plots[0]["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_shows_the_numbers_escaped_and_offline():
    data = check_compress(json.loads(json.dumps(SUMMARY)), __import__("pathlib").Path("compress.json"))
    page = compress_report_html(data)
    assert_numbers_of(page, SUMMARY)
    assert "<script>alert(1)" not in page and "<b>model</b>" not in page  # names are text, not markup
    assert parse(page).scripts == 0
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    assert "default-src 'none'" in csp and "script-src" not in csp  # no script, no network
    assert "http://" not in page and "https://" not in page


def test_report_of_a_scan_folder_with_compress_json(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    make_atlas(evil=False).save(run)
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run))
    assert code == 0, err
    assert 'id="compress-section"' not in (run / "report.html").read_text(encoding="utf-8")
    (run / "compress.json").write_text(json.dumps(SUMMARY, indent=2))
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run))
    assert code == 0, err
    page = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="compress-section"' in page and 'href="#compress-section"' in page
    assert 'id="heatmaps-section"' in page  # still the atlas report
    assert_numbers_of(page, SUMMARY)
    # the atlas report's three scripts, nothing more (the section has none)
    assert len(re.findall(r"<script", page, re.I)) == 3
    assert page == report_html(make_atlas(evil=False), load_compress(run))


def _edit(**change):
    data = json.loads(json.dumps(SUMMARY))
    data["summary"][1].update(change)
    return json.dumps(data)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not valid JSON (line 1"),
        (json.dumps({"summary": []}), "non-empty 'summary' list"),
        (_edit(accuracy="high"), "summary[1].accuracy must be a number"),
        (_edit(low=0.9), "is not 0 <= low <= accuracy <= high <= 1"),
        (_edit(ratio=1.5), "summary[1].ratio 1.5 is outside [0, 1)"),
        (_edit(prefill_s=-1), "summary[1].prefill_s must be a number >= 0"),
    ],
)
def test_invalid_compress_json_is_one_line_and_loses_nothing(monkeypatch, capsys, tmp_path, text, needle):
    run = tmp_path / "run"
    make_atlas(evil=False).save(run)
    (run / "report.html").write_text("earlier report")
    (run / "compress.json").write_text(text)
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run))
    assert_only_error_line(code, err, "compress.json is not a valid compress summary", needle)  # no Traceback too
    assert (run / "report.html").read_text() == "earlier report"  # nothing written, nothing lost


def test_compress_command_writes_the_report(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    lines = []
    for k in range(2):
        context = " ".join(["the cat sat on the mat and the dog sat on the log"] * 4) + f" the code is {k}7{k}."
        lines.append(json.dumps({"context": context, "question": "what is the code?", "answer": f"{k}7{k}"}))
    task.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--ratio", "0.5",
        "--task", str(task), "--max-new-tokens", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "report.html" in stdout
    summary = json.loads((out / "compress.json").read_text())
    page = (out / "report.html").read_text(encoding="utf-8")
    assert_numbers_of(page, summary)
    assert {parse(page).rows[k][0][0] for k in range(2)} == {"full", "knorm"}
    # written into a scan run folder, the scan's report gains the section instead of being replaced
    run = tmp_path / "run"
    make_atlas(evil=False).save(run)
    code, _, err = run_cli(
        monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--ratio", "0.5",
        "--task", str(task), "--max-new-tokens", "2", "--out", str(run),
    )  # fmt: skip
    assert code == 0, err
    page = (run / "report.html").read_text(encoding="utf-8")
    assert 'id="heatmaps-section"' in page and 'id="compress-section"' in page
    assert_numbers_of(page, json.loads((run / "compress.json").read_text()))
