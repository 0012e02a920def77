"""Attribution methods: one small class per method that attributes a prediction to input tokens.

Layer: beside ``probes`` and ``edits`` (may import ``engine``, ``corpus``, ``models``, ``probes``);
never imported by the engine. See docs/explain.md and docs/methods/ (one page per method).

The package itself is callable: ``headmap.explain(model, tokenizer, texts, ...)`` is
:func:`headmap.explain.api.explain`, while ``headmap.explain.Rollout`` and the other names stay
reachable as in any package.
"""

import sys
import types

from .api import DEFAULT_METHODS, METHODS, explain, explain_and_measure, resolve_methods
from .attn_grad import AttnGrad
from .base import Job, Method, make_job
from .capture import Capture, row_product
from .faithfulness import Faithfulness
from .integrated_gradients import IntegratedGradients
from .last_layer_attention import LastLayerAttention
from .occlusion import Occlusion
from .rollout import Rollout
from .saliency import Saliency
from .targets import Target, parse_target

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "AttnGrad",
    "Capture",
    "Faithfulness",
    "IntegratedGradients",
    "Job",
    "LastLayerAttention",
    "Method",
    "Occlusion",
    "Rollout",
    "Saliency",
    "Target",
    "explain",
    "explain_and_measure",
    "make_job",
    "parse_target",
    "resolve_methods",
    "row_product",
]


class _CallableModule(types.ModuleType):
    """``headmap.explain`` the package, callable as ``headmap.explain(...)`` (the verb of the API)."""

    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
