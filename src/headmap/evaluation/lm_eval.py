"""lm-evaluation-harness model type ``headmap``: any harness task, run under headmap edits.

Needs the optional extra: ``pip install headmap[lm-eval]``. Importing this module registers the
model type (``lm_eval.api.registry.register_model("headmap")``)::

    import lm_eval, headmap.evaluation.lm_eval
    lm_eval.simple_evaluate(
        model="headmap",
        model_args={"pretrained": "smollm2", "edits": ["ablate:heads=[[18,6]]:mode=zero"]},
        tasks=["arc_easy"],
    )

Arguments (``model_args``): ``pretrained`` (what :func:`headmap.models.load_model` takes: a
built-in name, a local folder, a ``.gguf`` file or a hub id; or a model object, with
``tokenizer``), ``edits`` (one spec, several specs separated by ``;``, a list of specs or Edit
objects; none: the unedited model under the engine), ``atlas`` (a run folder of ``headmap scan``,
for heads rules), ``batch_size``, ``max_length``, ``dtype``, ``device``.

On the harness's command line, import the module first (``python -c "import
headmap.evaluation.lm_eval, lm_eval.__main__ as m; m.cli_evaluate()" run --model headmap ...``)
and pass edits with commas as JSON: ``--model_args '{"pretrained": "smollm2", "edits":
"ablate:heads=[[18,6]]"}'``.

Scoring follows the harness's definitions: ``loglikelihood`` sums the continuation's token
log-probabilities (trailing white space of the context moves to the continuation) and says whether
greedy decoding would produce it; ``loglikelihood_rolling`` scores a whole text in disjoint windows
of ``max_length`` tokens after a BOS/EOS prefix; ``generate_until`` decodes greedily (sampling
arguments are ignored, with a warning) until a stop string, EOS or ``max_gen_toks``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401  (registers the harness's own model types first)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("headmap.evaluation.lm_eval needs lm-evaluation-harness: pip install 'headmap[lm-eval]'") from exc

from ..corpus import Tokens
from ..engine import observe
from ..models import LoadedModel, load_model, pad_id, position_ids, wrap_model
from .editing import build_edits
from .scoring import DEFAULT_BATCH_SIZE, encode_pair, prefix_id, score_token_pairs

DEFAULT_GEN_TOKENS = 256


def _edit_list(edits: Any) -> list:
    if edits is None or edits == "" or edits == []:
        return []
    if isinstance(edits, str):
        return [part for part in edits.split(";") if part.strip()]
    if isinstance(edits, list | tuple):
        return list(edits)
    return [edits]


@register_model("headmap")
class HeadmapLM(LM):
    """A causal language model evaluated under the headmap engine with ``edits`` on."""

    def __init__(
        self,
        pretrained: Any = "smollm2",
        edits: Any = None,
        atlas: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        ignored = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",)}
        if ignored:
            warnings.warn(f"headmap model ignores arguments {sorted(ignored)}", stacklevel=2)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # the harness's command line asks for cuda:0 unless told otherwise
            warnings.warn(f"device {device!r} is not available here; the headmap model runs on the CPU", stacklevel=2)
            device = "cpu"
        if isinstance(pretrained, LoadedModel):
            self.lm = pretrained
        elif isinstance(pretrained, str):
            self.lm = load_model(pretrained, dtype=dtype, device=device or "cpu")
        else:
            self.lm = wrap_model(pretrained, tokenizer)
        if tokenizer is not None:
            self.lm.tokenizer = tokenizer
        if self.lm.tokenizer is None:
            raise ValueError("the headmap model needs a tokenizer (pass tokenizer= with a model object)")
        self.model = self.lm.model
        self.model.eval()
        self.tokenizer = self.lm.tokenizer
        self.edits = build_edits(_edit_list(edits), atlas, self.tokenizer)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else DEFAULT_BATCH_SIZE
        self.max_length = int(max_length or self.lm.max_length or 2048)
        self._toks = Tokens(self.tokenizer)
        self._device = next(self.model.parameters()).device

    # -- what the harness asks -------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.lm.model_id).replace("/", "__")

    @property
    def eot_token_id(self) -> int:
        value = getattr(self.tokenizer, "eos_token_id", None)
        return int(value) if isinstance(value, int) else pad_id(self.tokenizer)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self._toks, *req.args[:2]) for req in requests]
        scores = score_token_pairs(
            self.model, pairs, pad_id(self.tokenizer), self.edits, self.batch_size, self.max_length
        )
        out = [(s.logprob, s.greedy) for s in scores]
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        prefix = prefix_id(self.tokenizer)
        prefix = self.eot_token_id if prefix is None else prefix
        pairs, owner = [], []
        for k, req in enumerate(requests):
            tokens = self._toks.plain(req.args[0])
            for window in get_rolling_token_windows(tokens, prefix, self.max_length, 1):
                pairs.append(make_disjoint_window(window))
                owner.append(k)
        scores = score_token_pairs(
            self.model, pairs, pad_id(self.tokenizer), self.edits, self.batch_size, self.max_length
        )
        totals = [0.0] * len(requests)
        for k, s in zip(owner, scores, strict=True):
            totals[k] += s.logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            text = self._generate(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    # -- greedy decoding under the edits ---------------------------------------------------------
    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", DEFAULT_GEN_TOKENS)))
        if gen_kwargs.pop("do_sample", False) or float(gen_kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
            warnings.warn("the headmap model decodes greedily; sampling arguments are ignored", stacklevel=3)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ids = list(self._toks.pre) + self._toks.plain(context)
        if not ids:
            ids = [self.eot_token_id]
        ids = ids[-max(self.max_length - max_new, 1) :]
        generated: list[int] = []
        text = ""
        with torch.no_grad(), observe(self.model, edits=tuple(self.edits)):
            x = torch.tensor([ids], device=self._device)
            mask = torch.ones_like(x)
            res = self.model(input_ids=x, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
            for _ in range(max_new):
                token = int(res.logits[0, -1].argmax())
                if eos is not None and token == eos:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if any(stop and stop in text for stop in until) or len(ids) + len(generated) >= self.max_length:
                    break
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                res = self.model(
                    input_ids=torch.tensor([[token]], device=self._device),
                    attention_mask=mask,
                    position_ids=mask.sum(dim=1, keepdim=True) - 1,
                    past_key_values=res.past_key_values,
                    use_cache=True,
                )
        for stop in until:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text
