"""The engine on GPUs (issue 13), tested for its logic on CPU: block size from the free device memory
and the head count, half-precision inputs with float32 softmax, and no host sync between blocks."""

from __future__ import annotations

import torch

import headmap
from headmap.engine import attention
from headmap.engine.attention import (
    DEFAULT_BUDGET_BYTES,
    GPU_BLOCK_CAP,
    GPU_FREE_FRACTION,
    device_budget,
    rows_per_block,
)

GIB = 2**30


def test_cpu_keeps_the_default_budget():
    assert device_budget("cpu", heads=32) == headmap.engine_config.budget_bytes == DEFAULT_BUDGET_BYTES


def test_gpu_budget_from_free_memory_and_heads():
    # an 80 GiB H100 with 70 GiB free, Llama-3-8B (32 heads), one input of 32K tokens
    budget = device_budget("cuda", heads=32, free_bytes=70 * GIB)
    assert budget == GPU_BLOCK_CAP == 4 * GIB  # a quarter of 70 GiB is 17.5 GiB; capped (measured, see the constant)
    assert budget <= 70 * GIB * GPU_FREE_FRACTION
    # a GPU with less free memory: a quarter of it, rounded down to a power of two
    assert device_budget("cuda", heads=32, free_bytes=12 * GIB) == 2 * GIB
    rows = rows_per_block(1, 32, 32768, budget)
    assert rows == 4 * GIB // (32 * 32768 * 4 * 3) == 341  # the CPU default gives 5 rows
    assert rows_per_block(1, 32, 32768, DEFAULT_BUDGET_BYTES) == 5
    # more heads, fewer rows for the same memory
    assert rows_per_block(1, 64, 32768, budget) == rows // 2
    # the cap: 1024 rows of every head at 128K keys; a small model on a big GPU is capped
    assert device_budget("cuda", heads=2, free_bytes=512 * GIB) == 1 << (1024 * 2 * 131072 * 4 * 3).bit_length() - 1
    # little free memory: never below the CPU default
    assert device_budget("cuda", heads=32, free_bytes=100 * 2**20) == DEFAULT_BUDGET_BYTES


def test_budget_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setattr(headmap.engine_config, "budget_bytes", 8 * 2**20)
    assert device_budget("cuda", heads=32) == 8 * 2**20  # no CUDA call: the user's choice wins
    monkeypatch.setattr(headmap.engine_config, "budget_bytes", DEFAULT_BUDGET_BYTES)
    monkeypatch.setattr(headmap.engine_config, "gpu_budget", False)
    assert device_budget("cuda", heads=32) == DEFAULT_BUDGET_BYTES


def _attend(dtype, budget):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 16).to(dtype)
    k = torch.randn(2, 2, 40, 16).to(dtype)
    v = torch.randn(2, 2, 40, 16).to(dtype)
    module = torch.nn.Module()
    module.is_causal = True
    old = attention.CONFIG.budget_bytes
    attention.CONFIG.budget_bytes = budget
    try:
        return attention.headmap_attention_forward(module, q, k, v, None)[0]
    finally:
        attention.CONFIG.budget_bytes = old


def test_half_precision_softmax_in_float32():
    assert attention.softmax_dtype(torch.bfloat16) == torch.float32
    assert attention.softmax_dtype(torch.float16) == torch.float32
    out = _attend(torch.bfloat16, 4 * 40 * 4 * 3 * 2)  # tiny budget: many blocks
    assert out.dtype == torch.bfloat16
    whole = _attend(torch.bfloat16, DEFAULT_BUDGET_BYTES)  # one block
    # the same float32 softmax per row whatever the blocks: each row's output is computed alike
    assert torch.equal(out, whole)


def test_no_host_sync_between_blocks(monkeypatch):
    """The finite check reads the device once per attention call, not once per block."""
    calls = []
    real = torch.Tensor.__bool__

    def counting(self):
        calls.append(self.numel())
        return real(self)

    q = torch.randn(1, 4, 64, 16)
    k = torch.randn(1, 4, 64, 16)
    module = torch.nn.Module()
    module.is_causal = True
    from headmap.engine.registry import CallContext  # the engine's context of one attention call

    monkeypatch.setattr(attention, "context_for", lambda *a: CallContext(0, (), (), check_finite=True))
    monkeypatch.setattr(attention.CONFIG, "budget_bytes", 4 * 8 * 64 * 4 * 3)  # 8 rows a block: 8+ blocks
    blocks = list(attention._row_blocks(1, 4, 64, 64, True, 0))
    assert len(blocks) >= 5
    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    attention.headmap_attention_forward(module, q, k, k, None)
    monkeypatch.setattr(torch.Tensor, "__bool__", real)
    # syncs that remain: the block plans (once per forward and block, shared by all layers; here the
    # single call builds them) and one finite check per call; none per block from the finite check
    plans = len(blocks)
    assert len(calls) == 2 * plans + 1  # 2 per plan (masked segments, empty rows) + the finite check
    with_check_per_block = 2 * plans + plans
    assert len(calls) < with_check_per_block


def test_every_call_on_a_gpu_takes_the_device_budget(monkeypatch):
    """Not only scans: any session on a CUDA device (headmap.observe) sizes its blocks from the free memory,
    once per process and device (the CPU default made the block route 20x to 50x slower than flash sdpa
    on an H200, README)."""
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return 70 * GIB, 80 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(attention, "_GPU_BUDGETS", {})
    cuda = torch.device("cuda", 0)
    assert attention.call_budget(cuda, 32, 1) == GPU_BLOCK_CAP
    assert attention.call_budget(cuda, 32, 1) == GPU_BLOCK_CAP and len(calls) == 1  # asked once
    assert attention.call_budget(torch.device("cpu"), 32, 1) == DEFAULT_BUDGET_BYTES
    monkeypatch.setattr(headmap.engine_config, "budget_bytes", 8 * 2**20)
    assert attention.call_budget(cuda, 32, 1) == 8 * 2**20  # a budget the user set wins
