"""The atlas report without a browser: escaping, size bound, PNG figures, notebook summary, command line.

The browser tests (tests/test_report_browser.py) load the same pages in headless Chromium.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import synthetic_atlas
from bounds import U64, reorder
from cli_runner import assert_only_error_line as assert_one_line_error
from cli_runner import run as run_cli
from synthetic_atlas import EVIL, EVIL_FILE, EVIL_MODEL, make_atlas

from headmap.atlas import Atlas
from headmap.errors import OutputError
from headmap.report import SIZE_LIMIT_BYTES, json_for_script, report_html, summary_html, write_report
from headmap.report import data as report_data_module
from headmap.report.data import categories, report_data, token_texts

DATA_BLOCK = re.compile(r'<script type="application/json" id="headmap-data">(.*?)</script>', re.S)


def page_data(page: str) -> dict:
    match = DATA_BLOCK.search(page)
    assert match, "no data block"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def evil_page() -> str:
    return report_html(make_atlas())


# -- escaping ---------------------------------------------------------------------------------


def test_dangerous_strings_never_appear_raw(evil_page):
    for bad in [*EVIL, EVIL_MODEL, EVIL_FILE, "alert(3)</script>", "<script>alert(4)"]:
        if "<" in bad or ">" in bad or "&" in bad:
            assert bad not in evil_page, bad
    # three script elements (data, plotly.js, the page's code), each closed once: nothing injected
    assert len(re.findall(r"<script", evil_page, re.I)) == 3
    assert len(re.findall(r"</script", evil_page, re.I)) == 3
    plotly_js = re.findall(r"<script>(.*?)</script>", evil_page, re.S)[0]
    ours = evil_page.replace(plotly_js, "")  # plotly.js itself holds strings such as "<img"
    assert "<img" not in ours and "<svg" not in ours and "<b>" not in ours


def test_data_block_is_inert_and_round_trips(evil_page):
    block = DATA_BLOCK.search(evil_page).group(1)
    for ch in "<>&\u2028\u2029":
        assert ch not in block
    assert "</script" not in block.lower() and "<!--" not in block
    assert all(ord(c) < 128 for c in block)
    data = json.loads(block)
    assert data["title"] == EVIL_MODEL
    shown = {t for strip in data["strips"] for t in strip["text"]}
    for bad in EVIL:  # byte-level BPE decoding leaves these strings as they are
        assert bad in shown, bad
    assert any(t["text"] == EVIL[0] for t in data["sinks"]["tokens"])  # the sink chart labels it
    assert EVIL_FILE in json.dumps(data["settings"])


def test_title_is_escaped_and_csp_admits_only_the_page_scripts(evil_page):
    title = re.search(r"<title>(.*?)</title>", evil_page, re.S).group(1)
    assert "&lt;script&gt;" in title and "<" not in title.replace("&lt;", "")
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', evil_page).group(1)
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "unsafe-inline" not in csp.split(";")[1]
    scripts = re.findall(r"<script>(.*?)</script>", evil_page, re.S)
    assert len(scripts) == 2
    for code in scripts:
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "http://" not in csp and "https://" not in csp


def test_json_for_script_escapes():
    text = json_for_script({"a": "</script><!-- & \u2028 \u2029 é"})
    assert text == '{"a":"\\u003c/script\\u003e\\u003c!-- \\u0026 \\u2028 \\u2029 \\u00e9"}'
    assert json.loads(text) == {"a": "</script><!-- & \u2028 \u2029 é"}


def test_repr_html_escapes():
    atlas = make_atlas()
    out = atlas._repr_html_()
    assert "<script" not in out.lower()
    assert "&lt;script&gt;alert(&quot;model&quot;)&lt;/script&gt;&amp;" in out
    assert "4 layers x 4 heads (2 kv)" in out
    assert "sink" in out and "L0.H1: 0.99" in out  # the planted sink head tops its probe
    assert summary_html(atlas, k=1).count("L") >= 1


# -- content ----------------------------------------------------------------------------------


def test_data_holds_every_part():
    atlas = make_atlas()
    data = report_data(atlas)
    assert data["layers"] == 4 and data["heads"] == 4 and data["kv_heads"] == 2
    assert [m["id"] for m in data["metrics"]][:5] == [
        "sink/sink",
        "entropy/entropy",
        "prev_token/prev_token",
        "waad/waad",
        "induction/induction",
    ]
    assert {m["id"] for m in data["metrics"]} >= {"massive_values/q_massive", "massive_values/k_peak_ratio"}
    sink = next(m for m in data["metrics"] if m["id"] == "sink/sink")
    assert sink["value"][0 * 4 + 1] == 0.99 and len(sink["value"]) == 16
    assert dict(data["card"])["layers x heads"] == "4 x 4 (2 kv heads)"
    assert [t["probe"] for t in data["top"]][:2] == ["sink", "entropy"]
    assert data["top"][0]["rows"][0][:2] == [0, 1]
    maps = data["maps"]
    assert [s["sample"] for s in maps["samples"]] == [0, 1] and maps["samples"][0]["n"] == 8
    raw = base64.b64decode(maps["data"])
    assert len(raw) == 2 * 4 * 4 * 8 * 8
    assert maps["samples"][0]["starts"] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert len(data["strips"]) == 3 and data["strips"][0]["sink_layers"][0] == 4
    sinks = data["sinks"]["tokens"]
    assert (sinks[0]["sample"], sinks[0]["position"], sinks[0]["lifetime"]) == (0, 0, 4.0)
    assert sinks[0]["primary_sink"]["layers"] == [0, 1, 2, 3] and sinks[0]["max_norm_ratio"] == 20.0


def test_map_quantisation_is_close():
    atlas = make_atlas(map_samples=1, bins=8)
    data = report_data(atlas)
    raw = np.frombuffer(base64.b64decode(data["maps"]["data"]), dtype=np.uint8).reshape(4, 4, 8, 8)
    scale = np.array(data["maps"]["scale"]).reshape(4, 4)
    decoded = scale[..., None, None] * (raw / 255.0) ** 2
    want = np.zeros((4, 4, 8, 8))
    m = atlas.maps
    want[m.layer, m["head"], m.row_bin, m.col_bin] = m.value
    # 8-bit codes of sqrt(v / scale): a code is off by at most 1/2 step of 1/255, so v by at most
    # scale * (2 x (0.5 / 255) + (0.5 / 255)^2) <= scale / 255 * (1 + 1/510); 2 / 255 of the largest is a bound
    np.testing.assert_allclose(decoded, want, atol=2.0 / 255 * want.max(), rtol=0)


def test_categories_follow_the_rules():
    atlas = make_atlas()
    names, main, tags = categories(atlas)
    assert names[main[0, 1]] == "sink" and "sink" in tags[(0, 1)]
    assert names[main[1, 0]] == "previous-token"
    waad = atlas.heads[atlas.heads.metric == "waad"]
    local = {(int(r.layer), int(r.head)) for r in waad.itertuples() if r.value <= 3.0}
    assert all("local" in tags[k] for k in local)


def test_pooled_maps_equal_maps_of_fewer_bins():
    """Pooling 8 bins into 4 gives exactly the maps the probe would store with bins = 4."""
    from headmap.report.data import _pool

    rng = np.random.default_rng(0)
    t = 37
    full = rng.random((2, t, t))

    def pooled(bins):
        out = np.zeros((2, bins, bins))
        cells = np.zeros((bins, bins))
        for i in range(t):
            for j in range(t):
                out[:, i * bins // t, j * bins // t] += full[:, i, j]
                cells[i * bins // t, j * bins // t] += 1
        return out / cells

    # float64 means of positive terms over cells of at most 10 x 10 entries, summed in two orders:
    # reorder(100, u=U64) ~ 2.2e-14 plus the divisions (was rtol=1e-12)
    np.testing.assert_allclose(_pool(pooled(8), t, 2), pooled(4), rtol=reorder(100, u=U64) + 4 * U64)


def test_large_maps_are_pooled_and_limited(monkeypatch):
    atlas = make_atlas(map_samples=3, bins=64, length=200)
    data = report_data(atlas)
    assert [s["n"] for s in data["maps"]["samples"]] == [32, 32]  # MAP_BINS a side, MAP_SAMPLES samples
    assert any("pooled to 32" in n for n in data["notes"]) and any("2 of the 3" in n for n in data["notes"])
    monkeypatch.setattr(report_data_module, "MAP_CELLS", 4 * 4 * 8 * 8)
    data = report_data(atlas)
    assert [s["n"] for s in data["maps"]["samples"]] == [8]  # one sample, coarser bins
    assert len(base64.b64decode(data["maps"]["data"])) <= 4 * 4 * 8 * 8


def test_byte_level_tokens_are_decoded():
    assert token_texts(["Ġthe", "Ċ", "âĢĻ", "cat"]) == [" the", "\n", "\u2019", "cat"]
    assert token_texts(["▁the", "cat"]) == [" the", "cat"]
    assert token_texts(["[CLS]", "the", "##re"]) == ["[CLS]", " the", "re"]


def test_run_without_tokens_or_maps():
    atlas = make_atlas(tokens=False, map_samples=0, evil=False)
    data = report_data(atlas)
    assert data["strips"] == [] and data["sinks"] is None and data["maps"] is None
    assert "headmap-data" in report_html(atlas)


# -- size -------------------------------------------------------------------------------------


def test_report_of_a_32_by_32_model_with_20_long_samples_stays_under_10_mb(tmp_path):
    t0 = time.time()
    atlas = make_atlas(layers=32, heads=32, kv_heads=8, samples=20, length=2048, map_samples=20, bins=16)
    assert atlas.tokens["sample"].nunique() == 20 and atlas.maps["sample"].nunique() == 20
    path = write_report(atlas, out=tmp_path / "report.html")[0]
    size = path.stat().st_size
    assert size < SIZE_LIMIT_BYTES, f"{size:,} bytes"
    print(f"report of 32 x 32 heads, 20 samples of 2048 tokens: {size:,} bytes")
    data = page_data(path.read_text(encoding="utf-8"))
    assert len(data["maps"]["samples"]) == 2 and len(data["strips"]) == 4
    assert all(len(s["text"]) == 512 and s["total"] == 2047 for s in data["strips"])  # the last token: no row
    assert len(data["metrics"]) == 7 and len(data["metrics"][0]["value"]) == 1024
    assert time.time() - t0 < 120


# -- PNG figures ------------------------------------------------------------------------------


def png_info(path: Path) -> tuple[int, int, float]:
    """(width, height, dots per inch) of a PNG file, from its IHDR and pHYs chunks."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", raw[16:24])
    at = raw.find(b"pHYs")
    ppm = struct.unpack(">I", raw[at + 4 : at + 8])[0] if at > 0 else 0
    return width, height, ppm * 0.0254


def test_png_figures(tmp_path):
    atlas = make_atlas()
    written = write_report(atlas, out=tmp_path / "r.html", png_dir=tmp_path / "figs")
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert "sinks.png" in pngs and "heatmap-sink.png" in pngs and "heatmap-massive_values-q_massive.png" in pngs
    assert len(pngs) == 8  # 7 metrics + the sink chart
    for name in pngs:
        width, height, dpi = png_info(tmp_path / "figs" / name)
        assert round(dpi) == 300
        if name.startswith("heatmap-"):
            assert (width, height) == (1050, 900)  # 3.5 x 3 in: one column of a paper
        else:
            assert width == 2100 and 300 <= height <= 2700  # 7 in: two columns


# -- command line -----------------------------------------------------------------------------


def test_report_command(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    make_atlas().save(run)
    code, out, err = run_cli(monkeypatch, capsys, "report", str(run), "--png", str(tmp_path / "png"))
    assert code == 0, err
    assert (run / "report.html").is_file() and (tmp_path / "png" / "sinks.png").is_file()
    assert "report.html" in out
    code, out, err = run_cli(monkeypatch, capsys, "report", str(run), "--out", str(tmp_path / "other.html"))
    assert code == 0, err
    assert (tmp_path / "other.html").read_text(encoding="utf-8") == (run / "report.html").read_text(encoding="utf-8")
    # a scan with --overwrite replaces the stale report of the run it replaces
    make_atlas(evil=False).save(run, overwrite=True)
    assert not (run / "report.html").exists()


def test_report_command_bad_input(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "report", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "missing", "not a folder")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{not json")
    code, _, err = run_cli(monkeypatch, capsys, "report", str(corrupt))
    assert_one_line_error(code, err, "corrupt")
    (corrupt / "meta.json").write_text(json.dumps({"format": "headmap-atlas/1"}))
    (corrupt / "heads.parquet").write_bytes(b"garbage")
    code, _, err = run_cli(monkeypatch, capsys, "report", str(corrupt))
    assert_one_line_error(code, err, "missing or corrupt")
    code, _, err = run_cli(monkeypatch, capsys, "report", str(tmp_path))
    assert_one_line_error(code, err, "no meta.json")
    run = tmp_path / "run"
    make_atlas().save(run)
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run), "--out", str(tmp_path))
    assert_one_line_error(code, err, "is a folder")
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run), "--png", str(tmp_path / "afile"))
    assert_one_line_error(code, err, "--png", "is a file")
    with pytest.raises(OutputError, match="needs out="):
        write_report(make_atlas())


def test_scan_with_report_end_to_end(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "the cat sat on the mat <script>alert(1)</script> and looked at the door\n"
        "birds fly south in winter when the days grow short and cold\n"
    )
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "scan", str(tiny_llama_dir), "--corpus", str(corpus), "--out", str(out),
        "--no-progress", "--report",
    )  # fmt: skip
    assert code == 0, err
    assert "report.html" in stdout and "maps.parquet" in stdout
    page = (out / "report.html").read_text(encoding="utf-8")
    data = page_data(page)
    assert data["layers"] == 2 and data["heads"] == 4
    assert data["maps"] is not None and len(data["maps"]["samples"]) == 2
    assert any("<script>" in t or "script" in t for s in data["strips"] for t in s["text"])
    assert "<script>alert(1)" not in page
    maps = Atlas.load(out).maps
    per_sample = maps.groupby("sample").agg(rows=("value", "size"), length=("length", "first"))
    assert list(per_sample.index) == [0, 1]
    assert (per_sample["rows"] == 2 * 4 * np.minimum(per_sample["length"], 16) ** 2).all()


def test_synthetic_atlas_round_trips(tmp_path):
    atlas = make_atlas()
    atlas.save(tmp_path / "run")
    loaded = Atlas.load(tmp_path / "run")
    assert len(loaded.maps) == len(atlas.maps) and loaded.meta["model"] == synthetic_atlas.EVIL_MODEL


# -- token text for display ------------------------------------------------------------------------


def test_characters_split_over_tokens_are_shown_whole():
    """SmolLM2's pieces of 'Hi 😀 a<ZWSP>b': per-token decoding gives U+FFFD; the report decodes the stream."""
    pieces = ["Hi", "ĠðŁĺ", "Ģ", "Ġa", "âĢ", "ĭ", "b"]
    assert token_texts(pieces) == ["Hi", " 😀", "◌", " a", "\\u200b", "◌", "b"]
    # a sample with no space or newline is still byte-level (🙂 is f0 9f 99 82; 日 e6 97 a5)
    assert token_texts(["ðŁ", "ĻĤ", "æĹ", "¥"]) == ["🙂", "◌", "日", "◌"]
    # SentencePiece byte fallback
    assert token_texts(["▁I", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁ok"]) == [" I", "😀", "◌", "◌", "◌", " ok"]
    # invisible characters are shown escaped, whatever the tokenizer; a byte that starts no character as \xNN
    assert token_texts(["a\u200d", "\u2060b", "c\rd"], kind="text") == ["a\\u200d", "\\u2060b", "c\\rd"]
    assert token_texts(["Ġa", "Ģ"]) == [" a", "\\x80"]
    for texts in (token_texts(["ðŁ", "ĺ", "Ģ"]), token_texts(["âĢ", "ĭ"])):
        assert not any("\ufffd" in t or "â" in t or "Ģ" in t for t in texts), texts


def test_report_strips_decode_emoji_and_zero_width():
    atlas = make_atlas(evil=False)
    tokens = atlas.tokens
    first = tokens["sample"] == 0
    pieces = {1: "ĠðŁĺ", 2: "Ģ", 3: "âĢ", 4: "ĭ"}
    for pos, piece in pieces.items():
        tokens.loc[first & (tokens["position"] == pos), "token"] = piece
    text = report_data(atlas)["strips"][0]["text"]
    assert text[1:5] == [" 😀", "◌", "\\u200b", "◌"]
    assert not any("\ufffd" in t for s in report_data(atlas)["strips"] for t in s["text"])


# -- no link anywhere ------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [f"{tag} {k}={v}" for k, v in attrs if k in ("src", "href", "xlink:href") and v is not None]


def test_page_links_nowhere(evil_page):
    parser = _Links()
    parser.feed(evil_page)
    assert parser.links, "the page's own anchors (#card-section ...) should have been seen"
    assert not [link for link in parser.links if "http" in link], parser.links
    # plotly's mode bar logo link (hidden by displaylogo: false) is taken out of the inlined plotly.js as well
    assert 'href="https://plotly.com/"' not in evil_page
    assert not re.search(r"""\.href\s*=\s*["']https?:""", evil_page)


# -- output places checked before anything is read or written ------------------------------------------


def test_unwritable_png_place_writes_nothing(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    make_atlas().save(run)
    for bad in ("/proc/headmap-png", str(tmp_path / "afile" / "figs")):
        (tmp_path / "afile").write_text("x")
        code, _, err = run_cli(monkeypatch, capsys, "report", str(run), "--png", bad)
        assert_one_line_error(code, err, "--png")
        assert not (run / "report.html").exists()


def test_unwritable_out_is_refused_before_the_run_is_read(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    make_atlas().save(run)
    (run / "heads.parquet").write_bytes(b"garbage")  # reading the run would fail: the --out check comes first
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run), "--out", "/proc/headmap-report.html")
    assert_one_line_error(code, err, "--out /proc/headmap-report.html", "not writable")
    calls = []
    monkeypatch.setattr(Atlas, "load", classmethod(lambda cls, folder: calls.append(folder)))
    with pytest.raises(OutputError, match="--png"):
        write_report(run, png_dir="/proc/headmap-png")
    assert calls == []


def test_report_of_an_unfinished_scan_says_resume(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    (run / ".headmap-checkpoint").mkdir(parents=True)
    (run / ".headmap-checkpoint" / "progress.json").write_text(json.dumps({"inputs_done": 3, "inputs_total": 8}))
    code, _, err = run_cli(monkeypatch, capsys, "report", str(run))
    assert_one_line_error(code, err, "unfinished scan", "3 of 8 inputs done", "--resume", f"--out {run}")
