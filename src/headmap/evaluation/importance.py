"""Head importance (docs/methods/importance.md) and AttentionInfluence.

Every head h of every layer gets a gate xi_h that multiplies its output before the heads are merged
(o'_h = xi_h o_h, inside the headmap engine, as an :class:`~headmap.edits.Edit`). With the gates at
1 the model is unchanged. For a corpus of inputs x:

- ``grad_importance`` (Michel, Levy and Neubig 2019, "Are Sixteen Heads Really Better than One?"):
  I_h = mean over inputs x of | d L(x) / d xi_h | at xi = 1, where L(x) is the mean next-token
  loss of input x. One backward pass per batch gives every input's gradient: each input has its own
  gates (a [layers, batch, heads] tensor), so d(sum_x L(x)) / d xi_{h,x} = d L(x) / d xi_h.
  Michel et al. also normalise the scores within each layer; headmap reports them raw.
- ``ablation_delta``: mean over inputs of L(x) with xi_h = 0 minus L(x), one head at a time (zero
  ablation, one forward pass per head and batch).

Both come with their standard error over inputs and ``n``, the number of inputs.

``attention_influence`` ("AttentionInfluence: Adopting Attention Head Influence for Weak-to-Strong
Pretraining Data Selection", Hua et al. 2025): the per-document loss with chosen heads masked
(retrieval heads in the paper) minus the loss without masking; documents whose loss rises most
depend most on those heads (the paper selects pretraining data by this score, relative to the
base loss, which is also given). Heads are masked by zeroing their outputs unless other masking
edits are passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..corpus import Corpus, Sample, load_corpus, pad_batch
from ..edits import Edit
from ..engine import observe
from ..errors import CorpusError, OptionError
from ..models import max_positions, model_shape, pad_id, position_ids


class HeadGate(Edit):
    """Multiply each head's output by a gate: ``gate`` [layers, B or 1, heads] (may require grad)."""

    name = "head_gate"

    def __init__(self, gate: torch.Tensor) -> None:
        super().__init__(heads=None)
        self.gate = gate

    def bind(self, model: torch.nn.Module) -> None:
        layers, heads, _ = model_shape(model)
        if self.gate.dim() != 3 or self.gate.shape[0] != layers or self.gate.shape[2] != heads:
            shape = tuple(self.gate.shape)
            raise OptionError(f"head gate of shape {shape} does not fit {layers} layers x {heads} heads")

    def edit_output(self, block: Any, out: torch.Tensor) -> torch.Tensor:
        g = self.gate[block.layer]  # [B or 1, H]
        return out * g.to(out.dtype)[:, :, None, None]


def _samples(corpus: Any, tokenizer: Any, max_length: int | None, limit: int | None, seed: int) -> list[Sample]:
    """Samples from a Corpus, a corpus spec, a list of strings or a list of token-id lists."""
    if isinstance(corpus, Corpus):
        samples = list(corpus.samples)
    elif isinstance(corpus, str):
        if tokenizer is None:
            raise OptionError("a corpus spec needs the tokenizer")
        samples = list(load_corpus(corpus, tokenizer, max_length or 512, limit=limit, seed=seed).samples)
    else:
        samples = []
        for doc in corpus:
            if isinstance(doc, Sample):
                samples.append(doc)
            elif isinstance(doc, str):
                if tokenizer is None:
                    raise OptionError("text documents need the tokenizer")
                ids = list(tokenizer(doc, add_special_tokens=True)["input_ids"])
                samples.append(Sample(ids[:max_length] if max_length else ids))
            else:
                samples.append(Sample([int(t) for t in doc]))
    if limit is not None:
        samples = samples[:limit]
    samples = [s for s in samples if len(s.ids) >= 2]
    if not samples:
        raise CorpusError("importance needs inputs of at least 2 tokens (a token to predict)")
    return samples


def _batch(samples: Sequence[Sample], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([s.ids for s in samples], pad_id)
    return ids.to(device), mask.to(device)


def _loss_weights(samples: Sequence[Sample], width: int, device: torch.device) -> torch.Tensor:
    """[B, width - 1]: which predicted tokens count (target t + 1 of position t); ``info['loss_span']``
    = [start, end) limits them to the targets at those positions of the input."""
    w = torch.zeros((len(samples), width - 1), dtype=torch.float32)
    for r, s in enumerate(samples):
        n = len(s.ids)
        start, end = (s.info or {}).get("loss_span", (1, n))
        start, end = max(int(start), 1), min(int(end), n)
        if end <= start:
            raise CorpusError(f"input {r}: loss_span {[start, end]} holds no token to predict")
        pad = width - n
        w[r, pad + start - 1 : pad + end - 1] = 1.0  # target at input position p is predicted at p - 1
    return w.to(device)


def per_input_loss(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """[B] mean next-token cross-entropy of each input over the targets ``weights`` selects."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    return (nll * weights).sum(dim=1) / weights.sum(dim=1)


def _mean_stderr(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and its standard error (0 with one input)."""
    n = values.shape[0]
    mean = values.mean(axis=0)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, values.std(axis=0, ddof=1) / np.sqrt(n)


def gate_gradients(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    pad_id: int = 0,
    batch_size: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-input d L(x) / d xi at xi = 1: ([inputs, layers, heads] float64, [inputs] base losses)."""
    layers, heads, _ = model_shape(model)
    device = next(model.parameters()).device
    grads, losses = [], []
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # only the gates need gradients
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            ids, mask = _batch(chunk, pad_id, device)
            weights = _loss_weights(chunk, ids.shape[1], device)
            gate = torch.ones((layers, len(chunk), heads), device=device, requires_grad=True)
            with torch.enable_grad(), observe(model, edits=[HeadGate(gate)]):
                loss = per_input_loss(model, ids, mask, weights)
                (g,) = torch.autograd.grad(loss.sum(), gate)
            grads.append(g.permute(1, 0, 2).double().cpu().numpy())
            losses.append(loss.detach().double().cpu().numpy())
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return np.concatenate(grads), np.concatenate(losses)


def gated_losses(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    gate: torch.Tensor | None,
    pad_id: int = 0,
    batch_size: int = 4,
    edits: Sequence = (),
) -> np.ndarray:
    """[inputs] loss of each input with head outputs multiplied by ``gate`` [layers, 1, heads] (None: no gate)."""
    device = next(model.parameters()).device
    out = []
    active = list(edits) + ([HeadGate(gate.to(device))] if gate is not None else [])
    with torch.no_grad(), observe(model, edits=active):
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            ids, mask = _batch(chunk, pad_id, device)
            weights = _loss_weights(chunk, ids.shape[1], device)
            out.append(per_input_loss(model, ids, mask, weights).double().cpu().numpy())
    return np.concatenate(out)


def head_importance(
    model: torch.nn.Module,
    tokenizer: Any = None,
    corpus: Any = "text",
    max_length: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    gradients: bool = True,
    ablation: bool = True,
    heads: Sequence[tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Gradient importance and zero-ablation loss deltas of every head over ``corpus``.

    ``corpus``: a corpus spec (``text``, ``repeats``, a file...), a :class:`~headmap.corpus.Corpus`,
    or a list of strings or token-id lists; ``limit`` keeps the first inputs (a built-in corpus
    spec makes 8 unless told). A sample's ``info['loss_span']`` = [start, end) limits
    the loss to the targets at those positions (e.g. the second copy of a repeated sequence).
    ``heads`` limits the ablation (one forward pass per head and batch) to those heads.

    Returns one row per head: ``layer, head, kv_head, grad_importance, grad_stderr, ablation_delta,
    ablation_stderr, n`` (NaN where a part was not computed) and ``attrs['base_loss']``.
    """
    if max_length is None and isinstance(corpus, str):
        max_length = min(512, max_positions(model.config) or 512)
    samples = _samples(corpus, tokenizer, max_length, limit, seed)
    layers, nheads, _ = model_shape(model)
    kv = getattr(getattr(model, "config", None), "num_key_value_heads", None) or nheads
    group = max(nheads // kv, 1)
    pad = pad_id(tokenizer, model)
    was_training = model.training
    model.eval()
    try:
        grad_mean = grad_se = np.full((layers, nheads), np.nan)
        base = None
        if gradients:
            g, base = gate_gradients(model, samples, pad, batch_size)
            grad_mean, grad_se = _mean_stderr(np.abs(g))
        abl_mean = np.full((layers, nheads), np.nan)
        abl_se = np.full((layers, nheads), np.nan)
        if ablation:
            base = gated_losses(model, samples, None, pad, batch_size)
            targets = sorted({(int(la), int(h)) for la, h in heads}) if heads is not None else None
            for layer in range(layers):
                for head in range(nheads):
                    if targets is not None and (layer, head) not in targets:
                        continue
                    gate = torch.ones((layers, 1, nheads))
                    gate[layer, 0, head] = 0.0
                    delta = gated_losses(model, samples, gate, pad, batch_size) - base
                    m, se = _mean_stderr(delta[:, None])
                    abl_mean[layer, head], abl_se[layer, head] = m[0], se[0]
    finally:
        model.train(was_training)
    rows = [
        {
            "layer": layer,
            "head": head,
            "kv_head": head // group,
            "grad_importance": float(grad_mean[layer, head]),
            "grad_stderr": float(grad_se[layer, head]),
            "ablation_delta": float(abl_mean[layer, head]),
            "ablation_stderr": float(abl_se[layer, head]),
            "n": len(samples),
        }
        for layer in range(layers)
        for head in range(nheads)
    ]
    frame = pd.DataFrame(rows)
    frame.attrs["base_loss"] = float(np.mean(base)) if base is not None else float("nan")
    return frame


def attention_influence(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Any,
    heads: Sequence[tuple[int, int]] | None = None,
    edits: Sequence | None = None,
    max_length: int | None = None,
    batch_size: int = 4,
) -> pd.DataFrame:
    """Per-document loss with ``heads`` masked (outputs zeroed; or ``edits``) minus the loss without.

    Returns one row per document: ``doc, tokens, loss_base, loss_masked, influence`` (masked - base)
    and ``relative`` (influence / loss_base). Sort by ``relative`` (or ``influence``) to select the
    documents that depend most on the heads.
    """
    if (heads is None) == (edits is None):
        raise OptionError("attention_influence needs either heads= (zeroed) or edits= (the masking edits)")
    samples = _samples(documents, tokenizer, max_length, None, 0)
    layers, nheads, _ = model_shape(model)
    gate = None
    if heads is not None:
        heads = sorted({(int(la), int(h)) for la, h in heads})
        if not heads:
            raise OptionError("attention_influence: heads= is empty")
        gate = torch.ones((layers, 1, nheads))
        for layer, head in heads:
            if not (0 <= layer < layers and 0 <= head < nheads):
                raise OptionError(f"head L{layer}H{head} does not exist: the model has {layers} x {nheads} heads")
            gate[layer, 0, head] = 0.0
    pad = pad_id(tokenizer, model)
    base = gated_losses(model, samples, None, pad, batch_size)
    masked = gated_losses(model, samples, gate, pad, batch_size, edits or ())
    return pd.DataFrame(
        {
            "doc": range(len(samples)),
            "tokens": [len(s.ids) for s in samples],
            "loss_base": base,
            "loss_masked": masked,
            "influence": masked - base,
            "relative": (masked - base) / base,
        }
    )
