"""Cross-attention alignment maps in the report of an encoder-decoder run (T5, BART, Whisper).

For a run with ``cross_alignment`` rows, the cross-attention heads ranked by ``cross_monotonicity`` (at most
:data:`ALIGN_HEADS`, NaN last) each get one figure: a row of panels, one per input of the run's first
``map_inputs`` (``--map-inputs``, in ``meta.options``; a run without it: :data:`MAP_INPUTS`), each titled
with its input index and showing the decoder-position x source-position attention of that input,
``A_h[i, j]`` for decoder row i (teacher-forced target token) and source position j (source token, or audio
frame after the encoder's convolutions).

The maps are not stored by the scan (which never builds a T x T array): the report loads the run's model
again (its folder, or its hub id when the hub or the cache has it) and its corpus's first inputs, runs one
forward pass of each input alone under the engine and assembles that input's cross-attention rows from the
engine's blocks, exactly. Only short inputs get maps: at most :data:`MAX_DECODER` decoder rows and
:data:`MAX_SOURCE` source positions (Whisper's 1,500 frames fit); a longer input is named in a note and left
out. When the model or the inputs cannot be had again, the section says why instead.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import torch

from ..atlas import Atlas
from ..probes.base import Probe
from .towers import new_figure, png_data_uri

ALIGN_HEADS = 6
MAP_INPUTS = 2  # inputs with maps when the run's meta does not say (scan/check.py's MAP_INPUTS)
PANEL_IN = (2.4, 2.4)  # one input's panel when a figure holds several
PANELS_PER_ROW = 4
MAX_DECODER = 256
MAX_SOURCE = 1500
ALIGN_IN = (3.0, 2.6)


class CrossRecorder(Probe):
    """Keeps the cross-attention probabilities of batch row 0, block by block, as dense [H, Tdec, Tsrc] per layer."""

    name = "cross_maps"
    tower_aware = True

    def __init__(self, rows: int, keys: int) -> None:
        self.rows, self.keys = rows, keys
        self.maps: dict[int, torch.Tensor] = {}

    def update(self, block: Any) -> None:
        if not block.is_cross:
            return
        probs = block.probs[0].detach().to(torch.float64).cpu()  # [H, bq, bk]
        dense = self.maps.get(block.layer)
        if dense is None:
            dense = self.maps[block.layer] = torch.zeros(probs.shape[0], self.rows, self.keys, dtype=torch.float64)
        q, k = block.q_pos.cpu().long(), block.k_pos.cpu().long()
        dense[:, q[:, None], k[None, :]] = probs

    def commit(self) -> None:
        """Nothing to close: the maps are whole once the forward returns."""


def corpus_spec(corpus: dict[str, Any]) -> str | None:
    """The ``--corpus`` value that rebuilds a run's corpus from its description (None when it cannot)."""
    if corpus.get("kind") == "file" and corpus.get("path"):
        return str(corpus["path"])
    if corpus.get("kind") == "builtin" and corpus.get("name"):
        options = corpus.get("options") or {}
        parts = [str(corpus["name"])]
        for key, value in options.items():
            text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            parts.append(f"{key}={text}")
        return ":".join(parts)
    return None


def alignment_maps(loaded: Any, sample: Any) -> dict[int, np.ndarray]:
    """Per cross-attention layer, [heads, decoder rows, source positions] of one prepared input (exact, from
    the engine's blocks of one forward pass of that input alone)."""
    from ..corpus.pairs import collate_seq2seq
    from ..engine import observe
    from ..models import input_device, pad_id

    device = input_device(loaded.model)
    inputs = collate_seq2seq([sample], pad_id(loaded.tokenizer), device)
    rows = len(sample.info["decoder_ids"])
    if "input_features" not in inputs:
        inputs["input_ids"] = torch.tensor([list(sample.ids)], dtype=torch.long, device=device)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    recorder = CrossRecorder(rows, MAX_SOURCE)
    with torch.no_grad(), observe(loaded.model, probes=[recorder]):
        loaded.model(**inputs)
    out = {}
    for layer, dense in sorted(recorder.maps.items()):
        keys = _source_length(dense)
        out[layer] = dense[:, :, :keys].numpy()
    return out


def _source_length(dense: torch.Tensor) -> int:
    """The number of source positions a map covers (the last column any row attends to, plus one)."""
    seen = torch.nonzero(dense.abs().sum(dim=(0, 1)) > 0)
    return int(seen.max()) + 1 if len(seen) else 0


def map_inputs_of(meta: dict[str, Any]) -> int:
    """How many inputs get maps: the run's ``map_inputs`` (``meta.options``), else :data:`MAP_INPUTS`."""
    cap = (meta.get("options") or {}).get("map_inputs")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 else MAP_INPUTS


def run_inputs(meta: dict[str, Any], count: int | None = None) -> tuple[Any, list[Any], str | None]:
    """(loaded model, the run's first ``count`` prepared inputs, None), or (None, [], why not); ``count`` None:
    :func:`map_inputs_of` the run."""
    from ..scan.check import load
    from ..scan.plan import corpus_maker
    from ..scan.seq2seq import audio_corpus

    count = map_inputs_of(meta) if count is None else count
    source = meta.get("model_source")
    where = meta.get("model_path") if source in ("folder", "builtin") else meta.get("model")
    if source == "object" or not where:
        return None, [], "the run's model was passed as an object, so the report cannot load it again"
    try:
        loaded = load(str(where), None, str(meta.get("dtype") or "float32"), "cpu", progress=False)
    except Exception as exc:  # noqa: BLE001  (the maps are a nicety: any failure to load is reported)
        return None, [], f"the run's model {where} cannot be loaded again here ({type(exc).__name__})"
    spec = corpus_spec(meta.get("corpus") or {}) or audio_corpus(loaded)
    if spec is None:
        return None, [], "the run's corpus cannot be rebuilt from its description"
    options = meta.get("options") or {}
    try:
        make = corpus_maker(
            loaded, int(options.get("max_length") or 512), limit=count, seed=int(options.get("seed", 0)), strict=False
        )
        data = make(spec)
    except Exception as exc:  # noqa: BLE001
        return None, [], f"the run's corpus {spec} cannot be read again here ({exc})"
    samples = list(data.samples[:count])
    if not samples or "decoder_ids" not in (samples[0].info or {}):
        return None, [], "the run's first input is not an encoder-decoder input"
    return loaded, samples, None


def first_input(meta: dict[str, Any]) -> tuple[Any, Any, str | None]:
    """(loaded model, first prepared input, None) of a run, or (None, None, why not)."""
    loaded, samples, why = run_inputs(meta, 1)
    return loaded, (samples[0] if samples else None), why


def chosen_heads(heads: Any, k: int = ALIGN_HEADS) -> list[tuple[int, int, float, float]]:
    """(layer, head, monotonicity, entropy) of the ``k`` cross heads of highest ``cross_monotonicity`` (NaN last)."""
    rows = heads[heads["probe"] == "cross_alignment"]
    mono = rows[rows["metric"] == "cross_monotonicity"].set_index(["layer", "head"])["value"]
    ent = rows[rows["metric"] == "cross_entropy"].set_index(["layer", "head"])["value"]
    order = mono.fillna(-math.inf).sort_values(ascending=False, kind="stable")
    return [(int(lh[0]), int(lh[1]), float(mono[lh]), float(ent.get(lh, math.nan))) for lh in order.index[:k]]


def _panel(ax: Any, grid: np.ndarray, title: str) -> None:
    ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    ax.set_xlabel("source position", fontsize=6)
    ax.set_ylabel("decoder position", fontsize=6)
    ax.tick_params(labelsize=5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=7)


def _figure(panels: list[tuple[np.ndarray, str]], title: str) -> str:
    """One figure: a panel per (map, panel title); ``title`` above them all when there are several."""
    if len(panels) == 1:
        fig = new_figure(ALIGN_IN)
        _panel(fig.add_subplot(), panels[0][0], title)
        return png_data_uri(fig)
    cols = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // cols)
    fig = new_figure((PANEL_IN[0] * cols, PANEL_IN[1] * rows + 0.3))
    for i, (grid, name) in enumerate(panels):
        _panel(fig.add_subplot(rows, cols, i + 1), grid, name)
    fig.suptitle(title, fontsize=8)
    return png_data_uri(fig)


def alignment_section(atlas: Atlas) -> str:
    """HTML of the alignment maps ('' when the run has no ``cross_alignment`` rows); every string escaped."""
    heads = atlas.heads
    if "probe" not in heads.columns or not (heads["probe"] == "cross_alignment").any():
        return ""
    e = html.escape
    chosen = chosen_heads(heads)
    count = map_inputs_of(atlas.meta)
    loaded, samples, why = run_inputs(atlas.meta, count)
    maps: dict[int, dict[int, np.ndarray]] = {}  # input -> layer -> [heads, decoder rows, source positions]
    left: list[str] = []
    for index, sample in enumerate(samples):
        rows = len(sample.info["decoder_ids"])
        if rows > MAX_DECODER:
            left.append(f"input {index} has {rows} decoder positions, more than the {MAX_DECODER} a map shows")
            continue
        try:
            maps[index] = alignment_maps(loaded, sample)
        except IndexError:
            left.append(f"input {index} has more than {MAX_SOURCE} source positions")
    if why is None and not maps:
        why = "; ".join(left) or "the run's corpus has no input"
    inputs = ", ".join(map(str, sorted(maps))) or "0"
    out = [
        '<section id="alignment-section"><h2>Cross-attention alignment</h2>',
        f'<p class="hint">Input{"s" if len(maps) > 1 else ""} {inputs}: each decoder position\'s attention over '
        f"the source, for the {len(chosen)} cross-attention heads of highest monotonicity (cross_alignment), one "
        f"figure each, one panel per input (the run's first {count}: --map-inputs). Computed again from the model, "
        f"one forward pass of each input alone (at most {MAX_DECODER} decoder and {MAX_SOURCE} source positions).</p>",
    ]
    if why is not None:
        out.append(f'<p class="hint">No maps: {e(why)}.</p></section>')
        return "\n".join(out)
    if left:
        out.append(f'<p class="hint">Left out: {e("; ".join(left))}.</p>')
    out.append('<div class="grid">')
    for layer, head, mono, ent in chosen:
        panels = [
            (layers[layer][head], f"input {index}")
            for index, layers in sorted(maps.items())
            if layer in layers and head < layers[layer].shape[0]
        ]
        if not panels:
            continue
        title = f"L{layer} H{head}: monotonicity {mono:.2f}, entropy {ent:.2f}"
        names = " ".join(name.split()[-1] for _, name in panels)
        caption = f"{title} ({', '.join(name for _, name in panels)})"
        out.append(
            f'<figure data-inputs="{e(names)}"><img alt="{e(title)}" src="{_figure(panels, title)}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    out.append("</div></section>")
    return "\n".join(out)
