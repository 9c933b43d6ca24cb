#!/usr/bin/env python
"""Sampling speed: one UNet denoising step for the base model, LoRA and DoRA unmerged, and DoRA merged.

The app and ``compare`` swap adapters into one pipeline and generate UNMERGED (the adapter stays a
separate module, so switching is free); a merged adapter costs what the base costs. DoRA's norm
``‖W0 + s·B·A‖_row`` is computed once per loaded adapter and cached (the weights do not change while
sampling), so unmerged DoRA should cost what unmerged LoRA costs: one base GEMM, the rank-r product and,
for DoRA, one ``[out]`` scale per layer.

One "step" is one UNet forward under ``no_grad`` with classifier-free guidance's batch of 2 (the
conditional and unconditional halves), on random latents, text states and SDXL micro-conditioning; the
base weights in ``--dtype`` with fp32 adapters under autocast, as in training. Variants alternate step by
step in one process (order rotated each round), medians over rounds:

1. ``base``, ``lora``, ``dora`` (unmerged; the base is the LoRA UNet with its adapters disabled), then
2. the DoRA UNet merged (``merge_adapters``: plain ``nn.Linear`` layers again) alternating with ``base``.

The adapters are given non-zero ``B`` (and DoRA a moved magnitude) so that they are not the identity.

    python benchmarks/bench_sampling.py --size full --dtype bfloat16 --resolution 512 \\
        --out benchmarks/results/cpu-full-sampling-512.json
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
from bench_adapters import DEFAULT_FULL_CONFIG, SIZES, TARGETS, _fast_random_unet, machine_info, unet_config  # noqa: E402


def build(ucfg: dict, dtype, init: str, method: str | None, rank: int, seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    from dora_diffusion import AdapterConfig, adapter_parameters, add_adapters

    torch.manual_seed(seed)
    if init == "fast":
        unet = _fast_random_unet(ucfg, torch.device("cpu"), dtype)
    else:
        unet = UNet2DConditionModel.from_config(ucfg).to(dtype)
    unet.eval().requires_grad_(False)
    if method:
        add_adapters(unet, AdapterConfig(method=method, rank=rank, alpha=float(rank), targets=list(TARGETS)))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                elif name.endswith("magnitude"):
                    p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
        assert adapter_parameters(unet), "no adapters were added"
    return unet


def inputs(ucfg: dict, batch: int, latent: int, res: int, dtype, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    pooled = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]
    return {
        "sample": torch.randn(batch, ucfg.get("in_channels", 4), latent, latent, generator=g).to(dtype),
        "timestep": torch.tensor([500] * batch),
        "encoder_hidden_states": torch.randn(batch, 77, ucfg["cross_attention_dim"], generator=g).to(dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(dtype),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, dtype=dtype),
        },
    }


def alternate(steps: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each callable of ``steps`` once per round, the order rotated each round; seconds per call."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for k in range(rounds):
        j = k % len(names)
        for name in names[j:] + names[:j]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--unet-config", default=str(DEFAULT_FULL_CONFIG))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="2: classifier-free guidance's two halves")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init", choices=("default", "fast"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from dora_diffusion import merge_adapters

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    init = args.init or ("fast" if args.size == "full" else "default")
    ucfg = unet_config(args.size, args.unet_config)
    latent = args.resolution // 8
    ucfg["sample_size"] = latent
    x = inputs(ucfg, args.batch, latent, args.resolution, dtype, args.seed)
    t_start = time.perf_counter()
    lora_unet = build(ucfg, dtype, init, "lora", args.rank, args.seed)
    dora_unet = build(ucfg, dtype, init, "dora", args.rank, args.seed)

    def forward(unet, enabled=True):
        from dora_diffusion.layers import adapter_modules

        adapters = [m for _, m in adapter_modules(unet)]  # found once: the timed call only flips a flag

        def run():
            for m in adapters:
                m.enabled = enabled
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                return unet(**x, return_dict=False)[0]

        return run

    print(
        f"bench_sampling: size={args.size} dtype={args.dtype} res={args.resolution} batch={args.batch} "
        f"rank={args.rank} threads={threads} rounds={args.rounds}",
        flush=True,
    )
    phase1 = alternate(
        {"base": forward(lora_unet, enabled=False), "lora": forward(lora_unet), "dora": forward(dora_unet)},
        args.rounds,
        args.warmup,
    )
    unmerged_out = forward(dora_unet)().float()
    base_out = forward(lora_unet, enabled=False)().float()
    merged = merge_adapters(dora_unet)
    assert merged, "merge_adapters merged nothing"
    merged_out = forward(dora_unet)().float()
    # what is timed computes the same thing: merged = unmerged (to bf16 rounding), and the adapter is no identity
    scale = float(unmerged_out.abs().mean())
    check = {
        "merged_vs_unmerged_mean_abs": float((merged_out - unmerged_out).abs().mean()) / scale,
        "adapter_vs_base_mean_abs": float((unmerged_out - base_out).abs().mean()) / scale,
    }
    phase2 = alternate(
        {"base": forward(lora_unet, enabled=False), "dora-merged": forward(dora_unet)}, args.rounds, args.warmup
    )
    med = {k: statistics.median(v) for k, v in phase1.items()}
    med2 = {k: statistics.median(v) for k, v in phase2.items()}

    def stepwise(times: dict, a: str, b: str) -> float:  # rounds ran back to back: a slow phase divides out
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    ratios = {
        "dora/lora (unmerged, round by round)": stepwise(phase1, "dora", "lora"),
        "lora/base (round by round)": stepwise(phase1, "lora", "base"),
        "dora-merged/base (round by round)": stepwise(phase2, "dora-merged", "base"),
        "lora/base": med["lora"] / med["base"],
        "dora/base": med["dora"] / med["base"],
        "dora/lora (unmerged)": med["dora"] / med["lora"],
        "dora-merged/base": med2["dora-merged"] / med2["base"],
    }
    table = "\n".join(
        [
            "| variant | median step s | ratio |",
            "|---|---:|---:|",
            f"| base | {med['base']:.3f} | 1.000 |",
            f"| LoRA unmerged | {med['lora']:.3f} | {ratios['lora/base']:.3f} |",
            f"| DoRA unmerged | {med['dora']:.3f} | {ratios['dora/base']:.3f} |",
            f"| DoRA merged | {med2['dora-merged']:.3f} | {ratios['dora-merged/base']:.3f} (to its own base run) |",
        ]
    )
    print(table)
    print(
        f"DoRA / LoRA unmerged: {ratios['dora/lora (unmerged)']:.3f}, round by round "
        f"{ratios['dora/lora (unmerged, round by round)']:.3f} (goal <= 1.03)"
    )
    print(
        f"outputs: merged vs unmerged DoRA differ by {check['merged_vs_unmerged_mean_abs']:.2e}, "
        f"DoRA vs base by {check['adapter_vs_base_mean_abs']:.2e} (mean |difference| / mean |output|)"
    )
    result = {
        "machine": machine_info("cpu"),
        "config": {**vars(args), "threads": threads, "init": init, "unet_config": ucfg, "targets": TARGETS},
        "phase1_step_s": phase1,
        "phase2_step_s": phase2,
        "median_step_s": {**med, "dora-merged": med2["dora-merged"], "base (phase 2)": med2["base"]},
        "ratios": ratios,
        "outputs_relative_to_mean_abs": check,
        "goals": [
            {
                "goal": "unmerged DoRA <= 1.03x unmerged LoRA",
                "ratio": ratios["dora/lora (unmerged, round by round)"],
                "status": "PASS" if ratios["dora/lora (unmerged, round by round)"] <= 1.03 else "FAIL",
            }
        ],
        "table_markdown": table + "\n",
        "total_wall_s": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
