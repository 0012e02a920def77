"""meta.json of a scan: the model, the corpus, the probes and their corpora, options, versions, time, memory."""

from __future__ import annotations

import platform
import resource
import sys
import time
from importlib import metadata
from typing import Any

import torch

from ..engine.towers import language_tower, split_layer_key
from ..models import LoadedModel, device_text, input_device
from .plan import Plan
from .resume import Run


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("headmap", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_memory(device: torch.device) -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_gib": rss_kb / 2**20 if sys.platform != "darwin" else rss_kb / 2**30}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def tower_shapes(layers: dict) -> dict[str, list[tuple[int, tuple[int, int]]]]:
    """A session's ``layers`` (keyed by :func:`~headmap.engine.towers.layer_key`) as (layer, shape) per tower."""
    out: dict[str, list[tuple[int, tuple[int, int]]]] = {}
    for key, shape in layers.items():
        tower, layer = split_layer_key(key)
        out.setdefault(tower, []).append((layer, shape))
    return {t: sorted(v) for t, v in sorted(out.items())}


def describe(loaded: LoadedModel, plan: Plan, run: Run, options: dict[str, Any]) -> dict[str, Any]:
    """The meta dict of a finished scan.

    ``architecture`` gives the layers and heads of the model's language tower (a text model: all of it; a
    VLM: its language model; an encoder-decoder: its decoder); a run that saw other towers adds ``towers``,
    the same counts per tower.
    """
    model = loaded.model
    first = next(model.parameters())
    by_tower = tower_shapes(run.layers)
    main = language_tower(model)
    if main not in by_tower and by_tower:
        main = next(iter(by_tower))
    layer_shapes = by_tower.get(main, [])
    towers = {t: {"layers": len(v), "heads": v[0][1][0], "kv_heads": v[0][1][1]} for t, v in by_tower.items() if v}
    return {
        "model": loaded.model_id,
        "model_path": loaded.path,
        "model_source": loaded.source,
        "revision": loaded.revision,
        "architecture": {
            "model_type": model.config.model_type,
            "class": type(model).__name__,
            "causal": loaded.is_causal and not getattr(model.config, "is_encoder_decoder", False),
            "layers": len(layer_shapes),
            "heads": layer_shapes[0][1][0] if layer_shapes else None,
            "kv_heads": layer_shapes[0][1][1] if layer_shapes else None,
            "max_positions": loaded.max_length,
            **({"towers": towers} if set(towers) - {"text"} else {}),
        },
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": device_text(model),
        "corpus": plan.data.description,
        "probes": {p.name: p.params() for p in plan.probes},
        "probe_corpora": {p.name: g.corpus.name for g in plan.groups for p in g.probes},
        "skipped_probes": plan.skipped,
        "options": options,
        "versions": versions(),
        "wall_time_s": run.wall_time(),
        "forward_time_s": round(run.forward_time, 3),
        "memory": peak_memory(input_device(model)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed_from": run.resumed_from,
        "fingerprint": run.fingerprint,
    }
