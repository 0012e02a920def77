"""StreamingLLM: the first ``sinks`` tokens and the most recent ones. See docs/methods/presses/streaming.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerView, PressError, ScorerPress, check_count


@dataclass
class StreamingPress(ScorerPress):
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

    Keeps the ``sinks`` first tokens of each input (the attention sinks) and the most recent ones.
    Parameters: ``ratio`` (fraction of the cache removed; the recent window is what is left after
    the sinks, as kvpress's ``StreamingLLMPress``), ``sinks`` (default 4), ``window`` (when set, a
    fixed budget of ``sinks + window`` entries per head that ignores ``ratio``), ``decode`` (keep the budget while
    decoding too: each new token evicts the oldest entry after the sinks, as StreamingLLM does).

    score(j) = 2 for the sinks (position < sinks), else 1 + j / T: the kept set is the sinks and then
    the latest tokens.
    """

    name = "streaming"

    sinks: int = 4
    window: int | None = None
    decode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.name, "sinks", self.sinks)
        if self.window is not None:
            check_count(self.name, "window", self.window)
        if not isinstance(self.decode, bool):
            raise PressError(f"streaming: decode must be true or false, got {self.decode!r}")

    @property
    def evicts_in_decoding(self) -> bool:
        return bool(self.decode)

    def decode_scores(self, layer) -> torch.Tensor:
        pos = layer.positions.to(torch.float64)
        rel = pos - layer.item_start[:, None, None].to(torch.float64)
        recent = 1.0 + pos / max(layer.seen, 1)
        return torch.where((rel >= 0) & (rel < self.sinks), torch.full_like(pos, 2.0), recent)

    def budget(self, view: LayerView) -> int:
        if self.window is not None:
            return self.sinks + self.window
        return super().budget(view)

    def notes(self, length: int) -> list[str]:
        if self.window is not None and self.sinks + self.window >= length:
            return [
                f"streaming: sinks + window ({self.sinks} + {self.window}) cover the whole input of {length} tokens; "
                "the cache is kept whole"
            ]
        return []

    def score(self, view: LayerView) -> torch.Tensor:
        pos = view.positions().to(torch.float64)  # [B, T]
        recent = 1.0 + torch.arange(view.length, device=pos.device, dtype=torch.float64) / view.length
        score = torch.where((pos >= 0) & (pos < self.sinks), torch.full_like(pos, 2.0), recent[None, :].expand_as(pos))
        return score[:, None, :].expand(-1, view.kv_heads, -1)
