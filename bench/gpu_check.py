#!/usr/bin/env python
"""The engine's exactness on a CUDA device: what tests/test_fused.py and tests/test_sink.py prove on CPU.

On a tiny random Llama (grouped kv heads) and GPT-2, in float32 and bfloat16, on ``--device``:
  1. sink values of the fused route (one fused kernel per call) against brute force from eager
     ``output_attentions`` (float32: within tests/bounds.py's eager bound; bfloat16: within the
     bfloat16 rounding of the logits, see tests/test_fused.py);
  2. the block route (``engine_config.fused = False``) against the same brute force, with a padded
     batch too (left padding takes the block route);
  3. logits under the engine against eager;
  4. the block budget the engine picks from the free device memory (``device_budget``).
Prints one line per check with the largest difference and its bound, and exits 1 if any fails.

    python bench/gpu_check.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from bounds import eager_bound, reorder  # noqa: E402
from tiny_models import padded_batch, tiny  # noqa: E402

import headmap  # noqa: E402
from headmap.engine import fused  # noqa: E402
from headmap.engine.attention import device_budget  # noqa: E402
from headmap.probes import SinkProbe  # noqa: E402

T = 12


def brute_sink(model, ids, mask):
    with torch.no_grad():
        atts = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    per_input = []
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b]).flatten()
        first, rows = real[0], real[1:]
        per_input.append(np.stack([a[b][:, rows, first].double().mean(-1).cpu().numpy() for a in atts]))
    return np.stack(per_input).mean(0)


def sink(model, ids, mask, fused_on: bool) -> tuple[np.ndarray, int]:
    calls = []
    attend = fused.attend

    def spy(name, *a, **k):
        calls.append(name)
        return attend(name, *a, **k)

    fused.attend = spy
    headmap.engine_config.fused = fused_on
    try:
        probe = SinkProbe()
        with torch.no_grad(), headmap.observe(model, probes=[probe]):
            model(input_ids=ids, attention_mask=mask)
        return probe.values(), len(calls)
    finally:
        fused.attend = attend
        headmap.engine_config.fused = True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    failed = 0

    def report(name: str, diff: float, bound: float, extra: str = "") -> None:
        nonlocal failed
        ok = diff <= bound
        failed += not ok
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: max |diff| {diff:.3e} <= {bound:.3e}{extra}", flush=True)

    for kind in ("llama", "gpt2"):
        for dtype in (torch.float32, torch.bfloat16):
            model, side = tiny(kind)
            model = model.to(dev, dtype)
            ids = torch.randint(1, 97, (3, T), generator=torch.Generator().manual_seed(5)).to(dev)
            ones = torch.ones_like(ids)
            ref = brute_sink(model, ids, ones)
            # float32: the engine's own bound against eager; bfloat16: the logits' rounding (2^-8 relative,
            # logits of a few units) and each layer's bfloat16 output, two layers (tests/test_fused.py)
            bound = eager_bound(T) if dtype == torch.float32 else 4 * 2**-8 * 2
            name = f"{kind} {str(dtype).removeprefix('torch.')}"
            got, n = sink(model, ids, ones, True)
            report(f"{name} fused sink vs eager", float(np.abs(got - ref).max()), bound, f" ({n} fused calls)")
            got, n = sink(model, ids, ones, False)
            report(f"{name} block sink vs eager", float(np.abs(got - ref).max()), bound, f" ({n} fused calls)")
            pid, pmask = padded_batch([9, 12, 5], side)
            pid, pmask = pid.to(dev), pmask.to(dev)
            got, n = sink(model, pid, pmask, True)
            report(
                f"{name} padded sink vs eager",
                float(np.abs(got - brute_sink(model, pid, pmask)).max()),
                bound,
                f" ({n} fused calls)",
            )
            with torch.no_grad():
                eager = model(input_ids=ids).logits.float()
                with headmap.observe(model, probes=[SinkProbe()]):
                    under = model(input_ids=ids).logits.float()
            scale = eager.abs().max().item()
            lbound = reorder(64, 9 * 2) * scale if dtype == torch.float32 else 2**-6 * scale
            report(f"{name} logits under the engine vs eager", (under - eager).abs().max().item(), lbound)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        budget = device_budget(dev, heads=32)
        print(
            f"device_budget: {budget / 2**30:.1f} GiB for 32 heads with {free / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB free",
            flush=True,
        )
    print("all checks passed" if not failed else f"{failed} check(s) FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
