#!/usr/bin/env python
"""Where DoRA's extra time goes, per layer kind of SDXL's UNet: one adapted ``nn.Linear`` alone, forward and
backward, LoRA against DoRA and against DoRA's parts.

For each layer kind at a resolution (the shapes SDXL's attention layers have there: tokens, in, out), one
training "step" of the layer: ``A`` changed in place (as the optimizer does, so DoRA's cached norm is
stale and the first forward computes it), forward under bf16 autocast on a bf16 ``W0`` with fp32
adapters, backward of a random upstream gradient. Timed, alternating, median over rounds:

- ``lora``: our LoRA layer;
- ``dora``: our DoRA layer (the norm from the forward's own GEMM where the layer does not fold ``g``);
- ``dora-cached``: DoRA with the norm already known (its once-per-step cost removed);
- ``dora-separate``: DoRA with the norm by its own read of ``W0`` (``row_norm``) instead of the forward's GEMM;
- ``norm``: the norm alone (``row_norm``: a separate read of ``W0``), and ``norm-fp32-copy``: the norm as it
  was computed before, through an fp32 copy of ``W0``;
- for a residual tail (``to_out.0``), ``dora-keep``: without the recompute of ``z`` in backward.

    python benchmarks/bench_layers.py --resolution 256 --out benchmarks/results/cpu-layers-256.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import machine_info  # noqa: E402
from bench_sampling import alternate  # noqa: E402


def kinds(resolution: int) -> dict[str, tuple[int, int, int, bool]]:
    """name -> (tokens, in, out, residual tail) of SDXL's attention layers at ``resolution``."""
    t1, t2 = (resolution // 16) ** 2, (resolution // 32) ** 2  # latent / 2 and latent / 4, squared
    return {
        "level 1 self-attn q/k/v (640)": (t1, 640, 640, False),
        "level 1 to_out.0 (640)": (t1, 640, 640, True),
        "level 2 self-attn q/k/v (1280)": (t2, 1280, 1280, False),
        "level 2 to_out.0 (1280)": (t2, 1280, 1280, True),
        "cross-attn to_k/to_v (2048 -> 1280)": (77, 2048, 1280, False),
    }


def measure_kind(tokens: int, fin: int, fout: int, tail: bool, rank: int, rounds: int) -> dict:
    """One layer kind: the median ms of each variant (see the module's docstring)."""
    import torch
    from torch import nn

    from dora_diffusion.layers import DoRALinear, LoRALinear, acc, row_norm, squared_row_norm

    base = nn.Linear(fin, fout).to(torch.bfloat16)
    layers = {
        "lora": LoRALinear(base, rank, dtype=torch.float32),
        "dora": DoRALinear(base, rank, dtype=torch.float32),
    }
    if tail:
        layers["dora"].magnitude_grad = "recompute"  # what add_adapters sets for a residual tail
        layers["dora-keep"] = DoRALinear(base, rank, dtype=torch.float32)
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, fin).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(tokens, fout).to(torch.bfloat16)

    def step(layer, stale=True, separate=False):
        def run():
            if stale:
                with torch.no_grad():
                    layer.lora_A.add_(0.0)  # a new version: the norm is recomputed, as after a step
            if separate:
                layer.weight_norm()  # the norm by its own read of W0, cached before the forward
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(dy)

        return run

    dora = layers["dora"]
    w0_sq = squared_row_norm(base.weight)

    def norm():
        with torch.no_grad():
            row_norm(base.weight, dora.lora_A, dora.lora_B, dora.scaling, w0_sq)

    def norm_fp32_copy():
        with torch.no_grad():
            a = acc(dora.lora_A)
            return (a @ base.weight.to(a.dtype).T).T

    steps = {v: step(layer) for v, layer in layers.items()}
    steps["dora-cached"] = step(dora, stale=False)
    steps["dora-separate"] = step(dora, separate=True)
    steps["norm"] = norm
    steps["norm-fp32-copy"] = norm_fp32_copy
    times = alternate(steps, rounds, warmup=1)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    return {
        "tokens": tokens,
        "in": fin,
        "out": fout,
        "residual_tail": tail,
        "folds_g_into_w0": tokens > fin,
        "median_ms": med,
        "dora/lora": med["dora"] / med["lora"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name, (tokens, fin, fout, tail) in kinds(args.resolution).items():
        r = results[name] = measure_kind(tokens, fin, fout, tail, args.rank, args.rounds)
        med = r["median_ms"]
        print(
            f"{name:38s} t={tokens:5d}  lora {med['lora']:7.3f} ms  dora {med['dora']:7.3f} "
            f"({med['dora'] / med['lora']:.3f})  dora-separate {med['dora-separate']:7.3f}  "
            f"dora-cached {med['dora-cached']:7.3f}  norm {med['norm']:6.3f}  "
            f"norm-fp32-copy {med['norm-fp32-copy']:6.3f}" + (f"  dora-keep {med['dora-keep']:7.3f}" if tail else ""),
            flush=True,
        )
    out = {
        "machine": machine_info("cpu"),
        "config": {**vars(args)},
        "layers": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
