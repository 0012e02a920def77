"""What an attribution explains: one number per input, computed from the model's outputs.

``next``          log p(the model's own greedy next token | the text), at the last token (decoders);
``token:WORD``    log p(WORD | the text) at the last token; WORD must be one token for the tokenizer
                  (a bare integer is a token id when there is no tokenizer);
``contrast:A,B``  logit(A) - logit(B) at the last token, "why A rather than B" (Yin & Neubig 2022,
                  Interpreting Language Models with Contrastive Explanations); equal to
                  log p(A) - log p(B);
``span:K``        the sum of log p over K greedily generated tokens (the text plus the first K - 1 of
                  them is the input; its last K positions are the target rows);
``class:N``       logit N of a sequence classifier (the [CLS] row of an encoder, the last token of a decoder);
``similarity:TEXT`` the cosine similarity of the input's sentence embedding to TEXT's, for a sentence encoder
                  (a base model such as BertModel, e.g. all-MiniLM-L6-v2): the embedding is the mean of
                  the last hidden states over the real tokens, as sentence-transformers pools it, so y is
                  the very score the encoder was trained to rank sentences by (with no tokenizer, TEXT may
                  be comma-separated token ids). Every real token is a target row, weight 1/n (the mean).

The target rows (the query rows whose prediction is explained) are what attention methods start from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelError, OptionError
from ..models import is_causal_lm

KINDS = ("next", "token", "contrast", "span", "class", "similarity")
#: Targets read from a language model's next-token logits (the others: a classifier's logits, an encoder's states).
LM_KINDS = ("next", "token", "contrast", "span")


@dataclass(frozen=True)
class Target:
    """A parsed target: ``kind`` (one of :data:`KINDS`), the token ids it names, the class, the span length."""

    spec: str
    kind: str
    token: int | None = None
    foil: int | None = None
    index: int | None = None
    length: int = 1
    #: similarity: the reference text's sentence embedding [hidden] (mean of its last hidden states)
    reference: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def generates(self) -> bool:
        return self.kind in ("next", "span")

    @property
    def lm(self) -> bool:
        """Read from next-token logits (a causal LM, left padding, the last rows)."""
        return self.kind in LM_KINDS

    def read(self, out: Any, rows: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B] target values from the model's output object (``mask`` [B, W]: 1 on real tokens)."""
        if self.kind == "similarity":
            return self.similarity(out.last_hidden_state, mask)
        return self.value(out.logits, rows, chosen)

    def similarity(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B] cosine of each input's mean-pooled embedding (``hidden`` [B, W, D] over its real tokens)
        with the reference embedding; float32 arithmetic at least (float64 for float64 models)."""
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        m = mask.to(dt)[..., None]
        pooled = (hidden.to(dt) * m).sum(dim=1) / m.sum(dim=1)
        ref = self.reference.to(device=hidden.device, dtype=dt)
        return torch.nn.functional.cosine_similarity(pooled, ref[None], dim=-1)

    def value(self, logits: torch.Tensor, rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """[B] target values from the model's logits.

        ``logits``: [B, C] (class) or [B, K, V], the last K positions of the input; ``rows`` [B, W] the
        target rows (0/1); ``chosen`` [B, W] the token explained at each target row.
        """
        if self.kind == "class":
            return logits[:, self.index]
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        keep = logits.shape[1]
        rows, chosen = rows[:, -keep:].to(logits.dtype), chosen[:, -keep:]
        if self.kind == "contrast":
            score = logits[..., self.token] - logits[..., self.foil]
        else:
            score = logits.log_softmax(dim=-1).gather(-1, chosen[..., None])[..., 0]
        return (score * rows).sum(dim=-1)


def _is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _one_token(word: str, tokenizer, what: str) -> int:
    if tokenizer is None:
        if word.strip().isdigit():
            return int(word)
        raise OptionError(f"{what} '{word}' needs a tokenizer to be read; pass one, or give a token id")
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = " + ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(ids)) or "nothing"
        raise OptionError(
            f"{what} '{word}' is {len(ids)} tokens for this tokenizer ({pieces}), not one; "
            "choose a word that is a single token (often with a leading space, e.g. ' Paris')"
        )
    return ids[0]


def _reference(spec: str, text: str, model, tokenizer) -> torch.Tensor:
    """The sentence embedding of ``text`` (mean of the model's last hidden states over its tokens), detached."""
    if not text.strip():
        raise OptionError(f"target '{spec}': similarity needs a reference text, similarity:TEXT")
    if tokenizer is not None:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    elif all(t.strip().isdigit() for t in text.split(",")):
        ids = [int(t) for t in text.split(",")]
    else:
        raise OptionError(f"target '{spec}': the reference text needs a tokenizer; pass one, or give token ids 1,2,3")
    name = type(model).__name__
    if _is_classifier(model) or is_causal_lm(model.config):
        raise ModelError(
            f"target '{spec}' needs a sentence encoder (a base model such as BertModel, e.g. minilm), and {name} "
            "is a language model or classifier; use next or token:WORD on a language model, class:N on a classifier"
        )
    device = next(model.parameters()).device
    training = model.training
    model.eval()  # no dropout in the reference's embedding
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=device))
    finally:
        model.train(training)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise ModelError(
            f"target '{spec}' needs a sentence encoder whose output has last_hidden_state, and {name} returns "
            f"{type(out).__name__} without it; load the base model (e.g. AutoModel)"
        )
    return hidden[0].double().mean(dim=0)


def parse_target(spec: str, model, tokenizer=None) -> Target:
    """Read a target spec (``next``, ``token:WORD``, ``contrast:A,B``, ``span:K``, ``class:N``,
    ``similarity:TEXT``) for ``model``."""
    kind, _, arg = str(spec).partition(":")
    if kind not in KINDS:
        raise OptionError(
            f"unknown target '{spec}'; use next, token:WORD, contrast:A,B, span:K, class:N or similarity:TEXT"
        )
    name = type(model).__name__
    if kind == "similarity":
        return Target(spec, "similarity", reference=_reference(spec, arg, model, tokenizer))
    if kind == "class":
        if not _is_classifier(model):
            raise ModelError(
                f"target '{spec}' needs a sequence classifier, and {name} has no classification head; "
                "load a ...ForSequenceClassification model, or use a next-token target on a language model"
            )
        labels = int(getattr(model.config, "num_labels", 0))
        if not arg.strip().isdigit():
            raise OptionError(f"target '{spec}': the class must be a whole number from 0 to {labels - 1}")
        index = int(arg)
        if index >= labels:
            raise OptionError(f"target '{spec}': {name} has {labels} labels (0 to {labels - 1}); choose one of them")
        return Target(spec, "class", index=index)
    if _is_classifier(model) or not is_causal_lm(model.config) or model.get_output_embeddings() is None:
        raise ModelError(
            f"target '{spec}' needs a causal language model with its LM head, and {name} is not one; "
            "use class:N on a sequence classifier, similarity:TEXT on a sentence encoder"
        )
    if kind == "next":
        if arg:
            raise OptionError(f"target '{spec}': next takes no argument")
        return Target(spec, "next")
    if kind == "token":
        return Target(spec, "token", token=_one_token(arg, tokenizer, "target token"))
    if kind == "span":
        if not arg.strip().isdigit() or int(arg) < 1:
            raise OptionError(f"target '{spec}': span:K needs a whole number of tokens K >= 1")
        return Target(spec, "span", length=int(arg))
    words = arg.split(",")
    if len(words) != 2 or not all(words):
        raise OptionError(f"target '{spec}': contrast needs two tokens, contrast:A,B")
    a, b = (_one_token(w, tokenizer, "contrast token") for w in words)
    if a == b:
        raise OptionError(
            f"target '{spec}': the two contrast tokens are the same token (id {a}), so the contrast is 0; "
            "name two different tokens"
        )
    return Target(spec, "contrast", token=a, foil=b)
