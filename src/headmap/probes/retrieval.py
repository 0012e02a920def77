"""``retrieval``: heads that copy the needle while the model answers (Wu et al. 2024).

On needle-in-a-haystack inputs (the built-in ``needle`` corpus), the model answers a question
whose answer is a span of the context, the *needle* (positions [s, e) of the input). At each
decoding step t that emits token w_t, head h *copies* when the key it attends most,
j* = argmax_j A_h[t, j], lies inside the needle and holds the token being emitted (ids[j*] == w_t).
Each needle position counts once:

    retrieval[l, h] = | { j* over the steps t that copy } | / (e - s)

averaged over the inputs where the model reproduced the needle (its greedy answer equals the
needle's tokens), each input weighing the same. ``n`` is the number of such inputs.

Two modes:

- ``generate`` (the paper's): greedy decoding with a KV cache, as many steps as the answer has
  tokens; inputs whose answer differs from the needle are not counted.
- ``teacher``: one forward pass over the prompt followed by the answer's tokens; step t is the
  query that predicts answer token t, w_t is that token whether or not the model would have
  produced it, and every input counts. For models that cannot copy yet (small or random ones).

"Retrieval Head Mechanistically Explains Long-Context Factuality" (Wu, Wang, Xiao, Peng, Fu, 2024).
See docs/methods/retrieval.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..corpus import Batch, pad_batch
from ..engine.block import Block
from ..errors import ProbeError
from ..models import greedy_decode, logits_to_keep, position_ids
from .base import Needs
from .head import HeadMeanProbe, HeadStats

MODES = ("generate", "teacher")


@dataclass
class RetrievalProbe(HeadMeanProbe):
    #: "generate" (greedy decoding, the paper's) or "teacher" (answer given, no generation)
    mode: str = "generate"

    name = "retrieval"
    needs = Needs(corpus="needle", default_corpus="needle", causal=True, drives_model=True)

    _want: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _argmax: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _kv_heads: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    instances: int = field(default=0, init=False)
    reproduced: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ProbeError(f"retrieval mode must be one of {', '.join(MODES)} (got {self.mode!r})")

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode}

    # -- engine side: remember where each head looks from the rows that emit answer tokens --------
    def update(self, block: Block) -> None:
        if self._want is None:
            return
        self._kv_heads[block.layer] = block.num_kv_heads
        lo, hi = self._want  # absolute query positions to record
        rows = torch.nonzero((block.q_pos >= lo) & (block.q_pos < hi)).squeeze(-1)
        if rows.numel() == 0:
            return
        top = block.probs[:, :, rows, :].argmax(dim=-1) + block.k_pos[0]  # [B, H, r] absolute key positions
        slot = self._argmax.setdefault(block.layer, {})
        for i, row in enumerate(rows.tolist()):
            slot[int(block.q_pos[row])] = top[:, :, i]

    def commit(self) -> None:
        """Per forward call nothing to close: :meth:`run` scores whole inputs."""

    # -- scan side ---------------------------------------------------------------------------------
    def run(self, model: torch.nn.Module, batch: Batch, session: Any) -> None:
        """Answer every input of ``batch`` (``generate``) or read the given answer (``teacher``); score heads."""
        samples = batch.samples
        for k, s in enumerate(samples):
            if "needle_span" not in (s.info or {}) or "answer_ids" not in s.info:
                raise ProbeError(
                    f"retrieval needs needle-in-a-haystack inputs, and input {batch.index(k)} has no needle span "
                    "or answer; use --corpus needle"
                )
        answers = [list(s.info["answer_ids"]) for s in samples]
        steps = max(len(a) for a in answers)
        device = batch.input_ids.device
        self._argmax = {}
        if self.mode == "teacher":
            rows = [list(s.ids) + a for s, a in zip(samples, answers, strict=True)]
            ids, mask = pad_batch(rows, 0)  # left padding, so the answers end at the last column
            ids, mask = ids.to(device), mask.to(device)
            width = ids.shape[1]
            # query at position width - 1 - (len(a) - t) predicts answer token t of row b
            self._want = (width - 1 - steps, width - 1)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **logits_to_keep(model))
            start = [width - len(r) for r in rows]
            query_pos = [list(range(width - 1 - len(a), width - 1)) for a in answers]
            emitted_rows = answers
        else:
            width = batch.input_ids.shape[1]

            def want(k: int) -> None:  # forward k reads the query at column width - 1 + k
                self._want = (width - 1 + k, width + k)

            gen = greedy_decode(model, batch.input_ids, batch.attention_mask, steps, before_forward=want).tolist()
            start = [width - len(s.ids) for s in samples]
            query_pos = [list(range(width - 1, width - 1 + len(a))) for a in answers]
            emitted_rows = [gen[b][: len(a)] for b, a in enumerate(answers)]
        self._want = None
        self._score(samples, answers, start, query_pos, emitted_rows)
        self._argmax = {}

    def _score(self, samples, answers, start, query_pos, emitted_rows) -> None:
        for layer, by_pos in sorted(self._argmax.items()):
            heads = next(iter(by_pos.values())).shape[1]
            scores = np.full((len(samples), heads), np.nan)
            for b, sample in enumerate(samples):
                if self.mode == "generate" and emitted_rows[b] != answers[b]:
                    continue  # the model did not reproduce the needle: not counted
                s, e = sample.info["needle_span"]
                ids = sample.ids
                copied: list[set[int]] = [set() for _ in range(heads)]
                for q, w in zip(query_pos[b], emitted_rows[b], strict=True):
                    where = by_pos[q][b].tolist()  # [H] absolute key positions
                    for h, p in enumerate(where):
                        j = p - start[b]
                        if s <= j < e and ids[j] == w:
                            copied[h].add(j)
                scores[b] = [len(c) / (e - s) for c in copied]
            kv = self._kv_heads.get(layer, heads)
            self._stats.setdefault(layer, HeadStats.empty(heads, kv)).add(scores)
        self.instances += len(samples)
        if self.mode == "teacher":
            self.reproduced += len(samples)
        else:
            self.reproduced += sum(emitted_rows[b] == answers[b] for b in range(len(samples)))

    def warnings(self) -> list[str]:
        if self.reproduced or not self.instances:
            return []
        return [
            f"{self.name}: the model reproduced the needle in 0 of {self.instances} inputs, so no head is "
            f"scored (n = 0); try {self.name}:mode=teacher, shorter inputs or a larger model"
        ]

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()
        state["instances"] = np.array([self.instances, self.reproduced], dtype=np.int64)
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        counts = np.asarray(state.get("instances", np.zeros(2)), dtype=np.int64).reshape(-1)
        self.instances, self.reproduced = int(counts[0]), int(counts[1])
