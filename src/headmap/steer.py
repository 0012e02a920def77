"""Steering: run a model with attention edits on.

    with headmap.steer(model, edits=["ablate:heads=[[18,6]]"]):
        model.generate(...)

A steering session is an engine session with edits and no probes, so it composes with
:func:`headmap.observe`: an atlas measured inside ``steer`` measures the edited attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .edits import Edit, make_edits
from .engine.session import Session
from .specs import is_whole


def prepare(edits: Iterable[Edit], tokenizer: Any, prompt: str | None = None) -> None:
    """Let each edit resolve what needs the tokenizer (:meth:`Edit.prepare`): text spans found in
    ``prompt`` (a positional span checked to fit it), text-file references of mean ablation tokenised."""
    for edit in edits:
        edit.prepare(tokenizer, prompt)


def steer(
    model: Any,
    edits: str | Edit | Iterable[str | Edit],
    atlas: Any = None,
    tokenizer: Any = None,
    prompt: str | None = None,
) -> Session:
    """A context manager that runs ``model`` with ``edits`` (Edit objects or specs) applied.

    ``atlas`` (an Atlas or a run folder of ``headmap scan``) resolves heads rules such as
    ``"top 5% retrieval"``. With ``tokenizer`` (and ``prompt``), text spans are found in the prompt and
    text-file references of mean ablation are tokenised. Edits are checked against the model (their
    layers and heads must exist) when the ``with`` block starts: :class:`~headmap.errors.EditError`.
    An attention output that turns NaN or infinite under the edits raises
    :class:`~headmap.errors.NumericalError` naming the edits, the layer and the head.
    """
    objs = make_edits(edits, atlas=atlas)
    if tokenizer is not None:
        prepare(objs, tokenizer, prompt)
    return Session(model, edits=objs, check_finite=True)


@dataclass
class Comparison:
    """Greedy generations of one prompt without and with edits (what ``headmap steer`` prints)."""

    model_id: str
    prompt: str
    edits: list[str]  # each edit described, heads resolved
    without: str
    steered: str
    without_ids: list[int] = field(default_factory=list)
    steered_ids: list[int] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.without_ids == self.steered_ids


def compare(
    model: Any,
    edits: str | Edit | Iterable[str | Edit],
    prompt: str,
    max_new_tokens: int = 30,
    atlas: Any = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> Comparison:
    """Generate greedily from ``prompt`` without and with ``edits``; both runs use the headmap engine.

    ``model`` is a model object (then pass its ``tokenizer``) or anything :func:`headmap.load_model`
    loads. Every input is checked before anything is generated: the options, the edit specs, the
    atlas, the model (a causal language model), the spans (found in the prompt) and the heads (they
    must exist in the model). ``device_map``, ``max_memory``, ``offload_folder``: model parallel placement
    of a model headmap loads (:func:`headmap.load_model`); a model object keeps its own placement.
    """
    import torch

    from .engine.session import observe
    from .errors import ModelError, OptionError
    from .models import input_device, is_causal_lm, load_model, pad_id, wrap_model

    if not isinstance(prompt, str) or not prompt.strip():
        raise OptionError("--prompt is empty; give the text to continue")
    if not is_whole(max_new_tokens) or max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    objs = make_edits(edits, atlas=atlas)
    if isinstance(model, str) or model is None:
        placed = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        loaded = load_model(model, dtype=dtype, device=device, **placed)
    else:
        loaded = wrap_model(model, tokenizer)
    if loaded.tokenizer is None:
        raise ModelError("steering a prompt needs the model's tokenizer: pass tokenizer=")
    net, tok = loaded.model, loaded.tokenizer
    if not is_causal_lm(net.config) or not hasattr(net, "generate"):
        raise ModelError(
            f"{loaded.model_id} is not a causal language model (model type {net.config.model_type}); "
            "headmap steer compares generations, use headmap.steer in Python for other models"
        )
    prepare(objs, tok, prompt)
    for edit in objs:
        edit.bind(net)  # heads exist, rules resolved, means fitted: before anything is generated
    dev = input_device(net)  # a device-mapped model takes its inputs where its first module is
    enc = tok(prompt, return_tensors="pt")
    enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id(tok, net)}
    width = enc["input_ids"].shape[1]

    def generate() -> list[int]:
        with torch.no_grad():
            out = net.generate(**enc, **settings)
        return out[0, width:].tolist()

    with observe(net, check_finite=True):
        plain = generate()
    with Session(net, edits=objs, check_finite=True):  # NaN from an edit: an error naming it, not empty text
        steered = generate()
    return Comparison(
        model_id=loaded.model_id,
        prompt=prompt,
        edits=[e.describe() for e in objs],
        without=tok.decode(plain, skip_special_tokens=True),
        steered=tok.decode(steered, skip_special_tokens=True),
        without_ids=plain,
        steered_ids=steered,
    )
