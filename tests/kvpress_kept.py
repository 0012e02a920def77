"""Child of tests/test_kvpress_parity.py: the entries kvpress keeps, run with kvpress's own venv.

    .venv-kvpress/bin/python tests/kvpress_kept.py MODEL_DIR IDS.npy OUT.npz RATIO[,RATIO...]

Runs kvpress's SnapKVPress, PyramidKVPress, StreamingLLMPress, KnormPress (sdpa model) and
ObservedAttentionPress (eager model, as kvpress requires) with their default parameters on the
token ids of IDS.npy ([1, T]) and writes, per press, ratio and layer, the [B, Hkv, T] mask of the
entries kvpress kept (``NAME/RATIO/LAYER``) and the scores its press computed
(``NAME/RATIO/LAYER/scores``), and the defaults of each press's other parameters
(``defaults/NAME/FIELD``). The mask is read from kvpress's own result, not re-derived: each key
row of the compressed cache is matched to the one row of the full layer's keys it equals bit for
bit (random float keys are distinct; the child fails if a row matches none or several).

Imports kvpress and transformers only (never headmap: this venv has another transformers).
"""

from __future__ import annotations

import dataclasses
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kvpress import (  # noqa: E402
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from transformers import AutoModelForCausalLM  # noqa: E402

PRESSES = {
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
    "streaming": StreamingLLMPress,
    "knorm": KnormPress,
    "h2o": ObservedAttentionPress,
}


def kept_mask(full: torch.Tensor, pressed: torch.Tensor) -> torch.Tensor:
    """[B, H, T] bool: which rows of ``full`` [B, H, T, D] the rows of ``pressed`` [B, H, n, D] are."""
    same = (pressed[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # [B, H, n, T]
    hits = same.sum(-1)
    if not bool((hits == 1).all()):
        raise SystemExit(f"a kept key row matches {hits.min().item()} to {hits.max().item()} rows of the full keys")
    return same.any(2)


def record(model, name: str, ratio: float, ids: torch.Tensor, out: dict) -> None:
    press = PRESSES[name](compression_ratio=ratio)
    score, compress = press.score, press.compress

    def scoring(module, *args, **kwargs):
        scores = score(module, *args, **kwargs)
        out[f"{name}/{ratio}/{module.layer_idx}/scores"] = scores.detach().to(torch.float64).numpy()
        return scores

    def compressing(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        out[f"{name}/{ratio}/{module.layer_idx}"] = kept_mask(keys, new_keys).numpy()
        return new_keys, new_values

    press.score, press.compress = scoring, compressing
    with torch.no_grad(), press(model):
        model(ids, use_cache=True)


def main() -> int:
    folder, ids_path, out_path, ratios = sys.argv[1:5]
    torch.manual_seed(0)
    ids = torch.from_numpy(np.load(ids_path)).long()
    out: dict[str, np.ndarray] = {}
    for name, cls in PRESSES.items():  # kvpress's defaults, for the parent to check its own against
        for field in dataclasses.fields(cls):
            if field.name != "compression_ratio":
                out[f"defaults/{name}/{field.name}"] = np.array(field.default)
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()
        for name in PRESSES:
            if (name == "h2o") != (attn == "eager"):  # ObservedAttentionPress reads eager attention's weights
                continue
            for ratio in (float(r) for r in ratios.split(",")):
                record(model, name, ratio, ids, out)
    np.savez(out_path, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
