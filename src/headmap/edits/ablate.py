"""``ablate``: replace a head's output by zero, or by its mean output over a reference set.

    zero:  o'_h(i) = 0
    mean:  o'_h(i) = mean over the real tokens t of the reference inputs of o_h(t)

where o_h(i) = sum_j A_h[i, j] v_h(j) is head h's output at query i before the heads are merged
(and before the output projection). Michel et al. 2019 ("Are Sixteen Heads Really Better than
One?") mask heads to zero; mean ablation (the head's output replaced by its average, so the
residual stream keeps its usual offset) is the usual alternative in interpretability work, and
how retrieval heads are masked in "Retrieval Head Mechanistically Explains Long-Context
Factuality".

The mean comes from a recording run: :meth:`Ablate.fit_mean` runs the model over reference inputs
under the engine and averages every named head's output over the real (non-padding) query tokens;
``reference=`` does the same when the edit is bound. Mean mode without either is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import Block
from ..errors import EditError
from .base import Edit

MODES = ("zero", "mean")


class _RecordMeans(Edit):
    """Sums of each named head's output over real query tokens (only ever used while fitting)."""

    def __init__(self, heads) -> None:
        super().__init__(heads=heads)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def edit_output(self, block: Block, out: torch.Tensor) -> torch.Tensor:
        valid = block.query_valid.to(torch.float64)  # [B, bq]
        total = torch.einsum("bhrd,br->hd", out.detach().to(torch.float64), valid)  # [H, Dv]
        count = valid.sum()
        if block.layer in self.sums:
            self.sums[block.layer] += total
            self.counts[block.layer] += count
        else:
            self.sums[block.layer] = total
            self.counts[block.layer] = count
        return out


def _batches(inputs: Any) -> list[dict[str, torch.Tensor]]:
    """Model keyword batches from ids [B, T] / [T], a dict (or BatchEncoding), or a list of those."""
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs.view(1, -1)
        return [{"input_ids": ids}]
    if hasattr(inputs, "keys") and "input_ids" in inputs:
        keep = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        if isinstance(keep["input_ids"], torch.Tensor) and keep["input_ids"].dim() == 1:
            keep = {k: v.view(1, -1) for k, v in keep.items()}
        return [keep]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items = list(inputs)
        if items and all(isinstance(x, int) for x in items):
            return [{"input_ids": torch.tensor([items])}]
        out = []
        for item in items:
            out.extend(_batches(item))
        return out
    raise EditError(
        f"ablate: reference inputs must be token ids (a tensor or list), a dict with input_ids, or a list of "
        f"those; got {type(inputs).__name__}"
    )


class Ablate(Edit):
    """Replace the output of ``heads`` by zero (``mode="zero"``) or by its mean (``mode="mean"``).

    Mean mode needs the head means: call :meth:`fit_mean` (``Ablate(..., mode="mean").fit_mean(model,
    inputs)``), pass ``reference=`` inputs (fitted when a session binds the edit), or pass ``means=``
    ({layer: [heads, head_dim] tensor}) from an earlier fit.
    """

    name = "ablate"

    def __init__(
        self,
        heads: Any = None,
        mode: str = "zero",
        reference: Any = None,
        means: dict[int, torch.Tensor] | None = None,
        atlas: Any = None,
    ) -> None:
        if mode not in MODES:
            raise EditError(f"ablate: mode must be 'zero' or 'mean', got {mode!r}")
        super().__init__(heads=heads, atlas=atlas)
        self.mode = mode
        self.reference = reference
        self.means: dict[int, torch.Tensor] | None = (
            None if means is None else {int(k): torch.as_tensor(v, dtype=torch.float32) for k, v in means.items()}
        )
        self._fitted_on: int | None = None

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def prepare(self, tokenizer: Any, prompt: str | None = None) -> None:
        """Tokenise a text-file ``reference`` (a UTF-8 file, one reference input per line)."""
        if not isinstance(self.reference, (str, Path)):
            return
        path = Path(self.reference).expanduser()
        if not path.is_file():
            raise EditError(f"ablate: reference file {path} does not exist (a UTF-8 text file, one input per line)")
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise EditError(f"ablate: cannot read reference file {path}: {exc}") from exc
        if not lines:
            raise EditError(f"ablate: reference file {path} has no text")
        self.reference = [tokenizer(line, return_tensors="pt") for line in lines]

    def fit_mean(self, model: nn.Module, inputs: Any) -> Ablate:
        """Measure each named head's mean output over the real tokens of ``inputs``; returns self.

        Runs ``model`` under the engine without gradients. Call it before entering other sessions on the
        model (their probes would otherwise see the reference inputs).
        """
        from ..engine import active_sessions, observe

        if any(s.model is model for s in active_sessions()):
            raise EditError(
                "ablate: fit the mean outside other headmap sessions on this model (call fit_mean before "
                "entering observe/steer), so that their probes do not see the reference inputs"
            )
        batches = _batches(inputs)
        if not batches:
            raise EditError("ablate: the reference inputs are empty")
        if self.heads_rule is not None or self._shape is None:
            Edit.bind(self, model)  # resolve a heads rule, check the heads exist
        recorder = _RecordMeans(self.heads, tower=self.tower)
        device = next(model.parameters()).device
        with torch.no_grad(), observe(model, edits=[recorder]):
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()})
        if not recorder.sums:
            raise EditError("ablate: the reference inputs reached no attention layer the edit names")
        self.means = {
            layer: (recorder.sums[layer] / recorder.counts[layer].clamp(min=1)).to(torch.float32)
            for layer in recorder.sums
        }
        self._fitted_on = id(model)
        return self

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        if self.mode != "mean":
            return
        if self.reference is not None and self._fitted_on != id(model):
            self.fit_mean(model, self.reference)
        if self.means is None:
            raise EditError(
                "ablate: mode=mean needs the heads' mean outputs: call Ablate.fit_mean(model, inputs), or pass "
                "reference= inputs (or means=)"
            )
        layers = {l for l, _ in self.heads} if self.heads is not None else set(range(self._shape[0]))
        missing = sorted(layers - set(self.means))
        if missing:
            raise EditError(f"ablate: no mean output for layers {missing}; fit the mean on this model")

    def edit_output(self, block: Block, out: torch.Tensor) -> torch.Tensor:
        if self.mode == "zero":
            return self.on_heads(block, out, lambda x, heads: torch.zeros_like(x))
        mean = self.means[block.layer].to(device=out.device, dtype=out.dtype)  # [H, Dv]

        def replace(x: torch.Tensor, heads) -> torch.Tensor:
            return mean[heads][None, :, None, :].expand_as(x)

        return self.on_heads(block, out, replace)
