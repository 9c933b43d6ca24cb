#!/usr/bin/env python
"""Training-step speed and memory of LoRA / DoRA adapters on an SDXL-shaped UNet: ours vs PEFT.

One "step" is what a diffusion fine-tuning step does to the UNet: forward on random latents,
timesteps, encoder hidden states and SDXL micro-conditioning (pooled text embeds + time ids), MSE
loss against a random target, backward, AdamW step on the adapter parameters only. The UNet is a
``diffusers.UNet2DConditionModel`` with random weights (no download).

Variants, all at the same rank, alpha and targets (UNet attention ``to_q, to_k, to_v, to_out.0``):
``ours-lora``, ``ours-dora`` (``dora_diffusion.add_adapters``), ``peft-lora``, ``peft-dora``
(``peft.inject_adapter_in_model(LoraConfig(..., use_dora=...))``).

Every (variant, repeat) runs in a fresh subprocess of this script (``--worker``), variants
alternating round-robin (the order rotated each repeat), and the report gives medians over repeats.

Memory:
- CUDA: ``torch.cuda.max_memory_allocated`` reset before the first step; reported as the peak
  minus what was allocated before the first step (model, adapters, inputs), and the absolute peak.
- CPU: no allocator counter, so the process's peak RSS: its high-water mark is reset
  (``/proc/self/clear_refs``) just before the first step (falling back to ``getrusage`` ``ru_maxrss``
  where that is not allowed) and reported minus the RSS at that moment. Noisy (allocator caching).
- Both: "saved activations", the bytes autograd keeps for backward in one step, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters and buffers excluded).
  Deterministic; the memory figure to compare variants by.

    python benchmarks/bench_adapters.py --size tiny
    python benchmarks/bench_adapters.py --size medium --out benchmarks/results/cpu-medium.json
    python benchmarks/bench_adapters.py --size full --device cuda --dtype bfloat16 --resolution 1024 \
        --out benchmarks/results/gpu-full.json

Goals are printed as PASS/FAIL; the exit status does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ours-lora", "ours-dora", "peft-lora", "peft-dora")
# on request: DoRA keeping residual-tail outputs (memory_saving=False); DoRA with the norm's gradient (paper Eq. 6)
EXTRA_VARIANTS = ("ours-dora-keep", "ours-dora-exact")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FULL_CONFIG = REPO_ROOT.parent / "shared" / "sdxl" / "unet_config.json"

# SDXL-shaped configs: SDXL's block types, layers_per_block 2, linear projections, 64-wide heads
# ("attention_head_dim" is diffusers' name for the head COUNT), text_time micro-conditioning.
MEDIUM_UNET_CONFIG = {
    "sample_size": 48,  # latent 48 = 384 px: 576 / 144 tokens in the attention levels
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [128, 256, 384],  # SDXL: 320, 640, 1280
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 4],  # SDXL: 1, 2, 10
    "attention_head_dim": [2, 4, 6],  # head counts, 64 wide (SDXL: 5, 10, 20)
    "norm_num_groups": 32,
    "cross_attention_dim": 768,  # SDXL: 2048 (768 + 1280)
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 64,  # SDXL: 256
    "projection_class_embeddings_input_dim": 512 + 6 * 64,  # pooled text embeds 512 (SDXL 1280) + 6 time ids
}

SIZES = {
    # size: (default resolution in pixels, default batch, default sequence length)
    "tiny": (128, 2, 77),
    "medium": (384, 1, 77),
    "full": (1024, 1, 77),
}


def unet_config(size: str, full_config: str | os.PathLike[str]) -> dict:
    if size == "tiny":
        from dora_diffusion.models import TINY_UNET_CONFIG

        return {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET_CONFIG.items()}
    if size == "medium":
        return dict(MEDIUM_UNET_CONFIG)
    path = Path(full_config)
    if not path.is_file():
        raise SystemExit(f"--unet-config: {path} not found (the SDXL base 1.0 unet/config.json; pass its path)")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------
# Worker: one (variant, repeat) in a fresh process
# ------------------------------------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _release_free_memory() -> bool:
    """Hand the allocator's free memory back to the OS (glibc ``malloc_trim``), so that the RSS before the
    first step is what the process really holds: setup's freed temporaries would otherwise be reused by the
    steps without the RSS growing, and the growth would depend on what setup happened to free."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM), Linux >= 4.0
        return True
    except OSError:
        return False


def _peak_rss_kib(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def build_variant(unet, variant: str, rank: int, alpha: float):
    """Add the variant's adapters; return the list of trainable parameters."""
    import torch

    family, method, *options = variant.split("-")  # ours-dora-keep / -exact: see EXTRA_VARIANTS
    unet.requires_grad_(False)
    if family == "ours":
        from dora_diffusion import AdapterConfig, adapter_parameters, add_adapters

        add_adapters(
            unet,
            AdapterConfig(
                method=method,
                rank=rank,
                alpha=alpha,
                targets=list(TARGETS),
                memory_saving="keep" not in options,
                norm_grad="exact" if "exact" in options else "detach",
            ),
        )
        params = adapter_parameters(unet)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(TARGETS),
            use_dora=(method == "dora"),
            lora_dropout=0.0,
            init_lora_weights=True,
        )
        inject_adapter_in_model(cfg, unet)
        params = []
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                if p.dtype != torch.float32:  # adapter params stay fp32 under a half-precision base
                    p.data = p.data.float()
                params.append(p)
        if method == "dora":
            from peft.tuners.lora import LoraLayer

            layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
            assert layers and all(m.use_dora.get("default") for m in layers), "PEFT DoRA is not active"
            assert all("default" in m.lora_magnitude_vector for m in layers), "PEFT DoRA has no magnitude"
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}, f"{variant}: non-adapter parameters are trainable"
    assert all(p.dtype == torch.float32 for p in params), f"{variant}: adapter parameters are not fp32"
    return params


def _fast_random_unet(ucfg: dict, device, dtype):
    """The UNet built without its initialisers (on the meta device), then filled with N(0, 1/fan_in) weights
    and zero biases: the same shapes and dtypes in a fraction of the time (the full UNet's own init takes
    ~80 s on one CPU core). For timing and memory only: the values do not matter there, their scale little."""
    import math

    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(ucfg)
    finally:
        torch.set_default_dtype(default_dtype)
    unet.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    assert all(p.dtype == dtype for p in unet.parameters())
    return unet


class Setup:
    """One variant ready to train: UNet with adapters, optimizer, inputs, and its ``step``."""

    def __init__(self, cfg: dict, variant: str) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        self.device = device = torch.device(cfg["device"])
        dtype = getattr(torch, cfg["dtype"])
        seed = cfg["seed"]
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed)

        ucfg = cfg["unet_config"]
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            # built in place and in the base dtype (the full UNet is 2.6 B parameters; no .to() afterwards,
            # on which diffusers warns)
            if cfg.get("init") == "fast":
                unet = _fast_random_unet(ucfg, device, dtype)
            else:
                with torch.device(device):
                    unet = UNet2DConditionModel.from_config(ucfg)
        finally:
            torch.set_default_dtype(default_dtype)
        if cfg["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        unet.train()

        torch.manual_seed(seed + 1)  # adapter init independent of the UNet's
        params = build_variant(unet, variant, cfg["rank"], cfg["alpha"])
        self.unet, self.variant = unet, variant
        self.trainable_params = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)

        g = torch.Generator(device="cpu").manual_seed(seed + 2)  # same inputs for every variant
        b, lat, seq, res = (
            cfg["batch"],
            cfg["latent"],
            cfg["seq_len"],
            cfg["resolution"],
        )
        pooled = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        self.inputs = {
            "sample": rnd(b, ucfg.get("in_channels", 4), lat, lat),
            "timestep": torch.randint(0, 1000, (b,), generator=g).to(device),
            "encoder_hidden_states": rnd(b, seq, ucfg["cross_attention_dim"]),
            "added_cond_kwargs": {
                "text_embeds": rnd(b, pooled),
                "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * b, dtype=dtype, device=device),
            },
        }
        self.target = rnd(b, ucfg.get("out_channels", 4), lat, lat)
        self.autocast_dtype = dtype if cfg["autocast"] else None

    def step(self):
        import torch

        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
        ):
            pred = self.unet(**self.inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), self.target.float())
        loss.backward()
        self.opt.step()
        return loss

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_step(self) -> tuple[float, float, float]:
        """(wall s, process CPU s, loss) of one step."""
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.step()
        self.sync()
        return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())

    def saved_activation_bytes(self) -> tuple[int, int]:
        """Bytes (and count) of unique storages autograd saves for backward in one step, parameters,
        buffers and optimizer state excluded. Runs one more (real) step."""
        import torch

        exclude = {t.untyped_storage().data_ptr() for t in list(self.unet.parameters()) + list(self.unet.buffers())}
        exclude |= {
            s.untyped_storage().data_ptr()
            for group in self.opt.state.values()
            for s in group.values()
            if torch.is_tensor(s)
        }
        seen: dict[int, int] = {}
        keep = []

        def pack(t):
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in exclude and ptr not in seen and st.nbytes() > 0:
                seen[ptr] = st.nbytes()
                keep.append(st)  # keep it alive so its address is not reused within the step
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step()
        self.sync()
        keep.clear()
        return sum(seen.values()), len(seen)


def code_fingerprint() -> dict:
    """sha256 (first 12 hex) of the adapter code measured: results say which version they are of."""
    import hashlib

    import dora_diffusion.inject
    import dora_diffusion.layers

    return {
        Path(m.__file__).name: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()[:12]
        for m in (dora_diffusion.layers, dora_diffusion.inject)
    }


def git_info() -> dict:
    """Commit and modified files of the checkout (read-only git commands), if it is one."""

    def git(*a):
        try:
            return subprocess.run(
                ["git", *a],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD").strip()
    if not commit:
        return {}
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": commit, "modified": dirty}


def worker(cfg: dict) -> dict:
    """One (variant, repeat) in a fresh process: warm-up, timed steps, peak memory, saved activations."""
    import torch

    torch.set_num_threads(cfg["threads"])
    su = Setup(cfg, cfg["variant"])
    cuda = su.device.type == "cuda"

    # memory baseline (model, adapters, optimizer, inputs are there), then warm-up + timed steps
    su.sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    trimmed = _release_free_memory()
    rss_before = _rss_kib()
    reset_ok = _reset_peak_rss()
    maxrss_before = None if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for i in range(cfg["warmup"] + cfg["steps"]):
        dt, dc, loss = su.timed_step()
        if i >= cfg["warmup"]:
            times.append(dt)
            cpu_times.append(dc)
    out = {
        "variant": cfg["variant"],
        "repeat": cfg["repeat"],
        "step_s": times,
        "median_step_s": statistics.median(times),
        "step_cpu_s": cpu_times,  # process CPU time per step (all threads): a contention check on shared CPUs
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "trainable_params": su.trainable_params,
        "loss": loss,
        "code": code_fingerprint(),
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(
            mem_before_bytes=mem_before,
            peak_bytes=peak,
            peak_increase_bytes=peak - mem_before,
            memory_source="torch.cuda.max_memory_allocated",
        )
    else:
        peak_kib = _peak_rss_kib(reset_ok)
        out.update(
            rss_before_bytes=rss_before * 1024,
            peak_bytes=peak_kib * 1024,
            peak_increase_bytes=max(0, peak_kib - rss_before) * 1024,
            memory_source=("VmHWM reset via /proc/self/clear_refs" if reset_ok else "ru_maxrss")
            + (", after malloc_trim(0)" if trimmed else ""),
        )
        if maxrss_before is not None and maxrss_before >= peak_kib:
            out["memory_warning"] = "peak RSS was reached before the first step; the increase is a lower bound"

    # saved activations of one more step, after the memory reading (the hook keeps references)
    out["saved_activation_bytes"], out["saved_tensors"] = su.saved_activation_bytes()
    return out


def in_process(cfg: dict) -> list[dict]:
    """All variants in ONE process, alternating step by step (order rotated each step).

    A check for shared, noisy machines: a slow phase hits every variant alike, so the step-time
    RATIOS are stable where separate processes minutes apart are not. No per-variant peak memory here
    (one process); saved activations are still per variant.
    """
    import torch

    torch.set_num_threads(cfg["threads"])
    variants = cfg["variants"]
    setups = {v: Setup(cfg, v) for v in variants}
    for su in setups.values():
        for _ in range(cfg["warmup"]):
            su.timed_step()
    rec = {(v, k): ([], [], None) for v in variants for k in range(cfg["repeats"])}
    n = 0
    for k in range(cfg["repeats"]):
        for _ in range(cfg["steps"]):
            j = n % len(variants)
            n += 1
            for v in variants[j:] + variants[:j]:
                dt, dc, loss = setups[v].timed_step()
                rec[(v, k)][0].append(dt)
                rec[(v, k)][1].append(dc)
                rec[(v, k)] = (rec[(v, k)][0], rec[(v, k)][1], loss)
    saved = {v: su.saved_activation_bytes() for v, su in setups.items()}
    profiles = {v: profile_step(su) for v, su in setups.items()} if cfg.get("profile") else {}
    runs = []
    for (v, k), (times, cpu, loss) in rec.items():
        runs.append(
            {
                "variant": v,
                "repeat": k,
                "step_s": times,
                "median_step_s": statistics.median(times),
                "step_cpu_s": cpu,
                "trainable_params": setups[v].trainable_params,
                "loss": loss,
                "peak_bytes": None,
                "peak_increase_bytes": None,
                "memory_source": "n/a (in-process mode)",
                "saved_activation_bytes": saved[v][0],
                "saved_tensors": saved[v][1],
                "code": code_fingerprint(),
                **({"profile": profiles[v]} if v in profiles and k == 0 else {}),
            }
        )
    return runs


def profile_step(su: Setup) -> dict:
    """One more step under ``torch.profiler``: self CPU time per op (ms), the ops over 0.2% of the step,
    and the step's total. What differs between two variants' tables is where the difference goes."""
    from torch.profiler import ProfilerActivity, profile

    su.timed_step()  # a step outside the profiler first: the norm cache in its steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        su.timed_step()
    ops = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    total = sum(ms for ms, _ in ops.values())
    kept = {k: {"self_ms": round(ms, 2), "calls": n} for k, (ms, n) in ops.items() if ms >= 0.002 * total}
    return {"total_self_ms": round(total, 1), "ops": dict(sorted(kept.items(), key=lambda kv: -kv[1]["self_ms"]))}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _cpu_flags() -> list[str]:
    """The CPU features the bf16 GEMMs depend on (AMX tiles, AVX-512 bf16), as /proc/cpuinfo lists them."""
    wanted = ("amx_bf16", "amx_tile", "amx_fp16", "avx512_bf16", "avx512f", "avx512_vnni", "avx2")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def write_result(result: dict, out: str | None, show: bool = True) -> None:
    """A benchmark's result with the machine it ran on (CPU), to ``out`` (JSON) when given, printed if ``show``."""
    import json

    result["machine"] = machine_info("cpu")
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    if show:
        print(text)


def machine_info(device: str) -> dict:
    import diffusers
    import peft
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "threads_torch": torch.get_num_threads(),
        "cpu_flags": _cpu_flags(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["git"] = git_info()
    info["code"] = code_fingerprint()
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu_model"] or platform.processor() or "cpu"
    return info


def summarise(runs: list[dict], variants: list[str]) -> dict:
    per = {}
    for v in variants:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["repeat"])
        per[v] = {
            "step_s": [r["step_s"] for r in rs],
            "run_median_step_s": [r["median_step_s"] for r in rs],
            "median_step_s": _median([r["median_step_s"] for r in rs]),
            "median_step_cpu_s": _median([statistics.median(r["step_cpu_s"]) for r in rs]),
            # contention checks: the median of all timed steps pooled, and the fastest step
            "pooled_median_step_s": _median([t for r in rs for t in r["step_s"]]),
            "min_step_s": min(t for r in rs for t in r["step_s"]),
            "peak_increase_bytes": [r["peak_increase_bytes"] for r in rs if r["peak_increase_bytes"] is not None],
            "median_peak_increase_bytes": _median([r["peak_increase_bytes"] for r in rs]),
            "median_peak_bytes": _median([r["peak_bytes"] for r in rs]),
            "saved_activation_bytes": _median([r["saved_activation_bytes"] for r in rs]),
            "saved_activation_bytes_all": sorted({r["saved_activation_bytes"] for r in rs}),
            "trainable_params": rs[0]["trainable_params"],
            "memory_source": rs[0]["memory_source"],
            "final_loss": [r["loss"] for r in rs],
        }
    return per


def paired_ratio(runs: list[dict], a: str, b: str) -> float | None:
    """Median over repeats of (a's run median / b's run median) within the same round-robin round.

    Runs of one round are minutes apart at most, so a slow phase of a shared machine mostly hits both
    sides of a pair: a check on the plain ratio of medians.
    """
    by = {(r["variant"], r["repeat"]): r["median_step_s"] for r in runs}
    reps = sorted({r["repeat"] for r in runs})
    xs = [by[(a, k)] / by[(b, k)] for k in reps if (a, k) in by and (b, k) in by]
    return statistics.median(xs) if xs else None


def stepwise_ratio(runs: list[dict], a: str, b: str) -> float | None:
    """In-process runs: the median over steps of (a's step k / b's step k). Steps k of two variants ran
    back to back, so a slow phase of the machine divides out; the ratio of medians does not have that."""
    xs = []
    for ra in (r for r in runs if r["variant"] == a):
        rb = next((r for r in runs if r["variant"] == b and r["repeat"] == ra["repeat"]), None)
        if rb is not None and len(rb["step_s"]) == len(ra["step_s"]):
            xs += [x / y for x, y in zip(ra["step_s"], rb["step_s"], strict=True)]
    return statistics.median(xs) if xs else None


def ratios(per: dict, runs: list[dict]) -> dict:
    def r(a, b, key):
        if a in per and b in per and per[a][key] and per[b][key]:
            return per[a][key] / per[b][key]
        return None

    return {
        "ours-dora/ours-lora step": r("ours-dora", "ours-lora", "median_step_s"),
        "peft-dora/ours-dora step": r("peft-dora", "ours-dora", "median_step_s"),
        "peft-dora/peft-lora step": r("peft-dora", "peft-lora", "median_step_s"),
        "peft-lora/ours-lora step": r("peft-lora", "ours-lora", "median_step_s"),
        "ours-dora/ours-lora step (paired median)": paired_ratio(runs, "ours-dora", "ours-lora"),
        "ours-dora/ours-lora step (step by step)": stepwise_ratio(runs, "ours-dora", "ours-lora"),
        "peft-dora/ours-lora step (step by step)": stepwise_ratio(runs, "peft-dora", "ours-lora"),
        "peft-dora/ours-dora step (paired median)": paired_ratio(runs, "peft-dora", "ours-dora"),
        "ours-dora/ours-lora step (pooled median)": r("ours-dora", "ours-lora", "pooled_median_step_s"),
        "ours-dora/ours-lora step (min)": r("ours-dora", "ours-lora", "min_step_s"),
        "peft-dora/ours-dora step (pooled median)": r("peft-dora", "ours-dora", "pooled_median_step_s"),
        "ours-dora/ours-lora peak memory": r("ours-dora", "ours-lora", "median_peak_increase_bytes"),
        "ours-dora/ours-lora saved activations": r("ours-dora", "ours-lora", "saved_activation_bytes"),
        "peft-dora/ours-dora saved activations": r("peft-dora", "ours-dora", "saved_activation_bytes"),
    }


def goals(rat: dict) -> list[dict]:
    spec = [
        (
            "ours-dora step <= 1.10x ours-lora (aim 1.05)",
            "ours-dora/ours-lora step",
            lambda x: x <= 1.10,
        ),
        (
            "peft-dora step >= 1.3x ours-dora",
            "peft-dora/ours-dora step",
            lambda x: x >= 1.3,
        ),
        (
            "ours-dora peak memory <= ours-lora + 3% (saved activations)",
            "ours-dora/ours-lora saved activations",
            lambda x: x <= 1.03,
        ),
        (
            "ours-dora peak memory <= ours-lora + 3% (peak RSS / allocator peak)",
            "ours-dora/ours-lora peak memory",
            lambda x: x <= 1.03,
        ),
    ]
    out = []
    for text, key, ok in spec:
        x = rat.get(key)
        out.append(
            {
                "goal": text,
                "ratio": x,
                "status": "n/a" if x is None else ("PASS" if ok(x) else "FAIL"),
            }
        )
    return out


MIB = 2**20


def markdown(per: dict, device: str) -> str:
    base = per.get("ours-lora", {}).get("median_step_s")
    mem = "peak mem MiB (RSS increase)" if device == "cpu" else "peak mem MiB (over start)"
    lines = [
        f"| variant | median step ms | ratio to ours-lora | {mem} | saved activations MiB | trainable params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v, s in per.items():
        ratio = f"{s['median_step_s'] / base:.3f}" if base else "–"
        peak = s["median_peak_increase_bytes"]
        peak = "–" if peak is None else f"{peak / MIB:.1f}"
        lines.append(
            f"| {v} | {s['median_step_s'] * 1e3:.1f} | {ratio} | {peak} | "
            f"{s['saved_activation_bytes'] / MIB:.1f} | {s['trainable_params']:,} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=tuple(SIZES), default="medium")
    p.add_argument(
        "--unet-config",
        default=str(DEFAULT_FULL_CONFIG),
        help="the SDXL UNet config.json for --size full (default: %(default)s)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the base weights and inputs; adapter parameters stay float32",
    )
    p.add_argument(
        "--autocast",
        action="store_true",
        help="run the forward under torch.autocast(dtype)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels; latent = resolution / 8",
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="text tokens (default 77)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="default: = rank")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per run (default: 5 cpu, 10 cuda)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: 1 cpu, 3 cuda)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="runs per variant, round-robin, fresh process each",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--init",
        choices=("default", "fast"),
        default=None,
        help="weights: the UNet's own initialisers, or N(0, 1/fan_in) filled after a meta-device build "
        "(default: fast for --size full, whose own init takes minutes on a CPU)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ", ".join(VARIANTS + EXTRA_VARIANTS),
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores available)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="all variants in one process, alternating step by step: stable step-time ratios on a "
        "busy machine; no per-variant peak memory (saved activations still)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --in-process: one more step of each variant under torch.profiler, its op table in the JSON",
    )
    p.add_argument(
        "--resummarize",
        default=None,
        metavar="JSON",
        help="recompute the summary of an existing results file from its runs (no benchmarking)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON config path
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
    if bad or not variants:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    args.variants = variants
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(Path(args.worker).read_text())
        result = worker(cfg)
        Path(cfg["result_path"]).write_text(json.dumps(result))
        return 0
    if args.resummarize:  # rebuild summary, ratios, goals and table from a results file's runs
        old = json.loads(Path(args.resummarize).read_text())
        args.out = args.out or args.resummarize
        report(
            args,
            old["config"],
            old["runs"],
            old["total_wall_s"],
            old["machine"],
            old.get("created"),
        )
        return 0

    # a terminated driver stops its running worker and removes its temporary folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    res, batch, seq = SIZES[args.size]
    resolution = args.resolution or res
    if resolution % 8:
        raise SystemExit(f"--resolution must be a multiple of 8, got {resolution}")
    cuda = args.device == "cuda"
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ucfg = unet_config(args.size, args.unet_config)
    ucfg["sample_size"] = resolution // 8
    config = {
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "autocast": args.autocast,
        "resolution": resolution,
        "latent": resolution // 8,
        "batch": args.batch or batch,
        "seq_len": args.seq_len or seq,
        "rank": args.rank,
        "alpha": args.alpha or float(args.rank),
        "targets": TARGETS,
        "steps": args.steps or (10 if cuda else 5),
        "warmup": args.warmup if args.warmup is not None else (3 if cuda else 1),
        "repeats": args.repeats,
        "gradient_checkpointing": args.gradient_checkpointing,
        "init": args.init or ("fast" if args.size == "full" else "default"),
        "threads": threads,
        "seed": args.seed,
        "variants": args.variants,
        "profile": args.profile,
        "optimizer": "AdamW(lr=1e-4)",
        "loss": "MSE(unet(noisy latents, t, text states, time ids), random target)",
        "mode": "in-process, variants alternating step by step"
        if args.in_process
        else "one subprocess per (variant, repeat), variants round-robin",
        "unet_config": ucfg,
    }
    print(
        f"bench_adapters: size={args.size} device={args.device} dtype={args.dtype} res={resolution} "
        f"(latent {resolution // 8}) batch={config['batch']} rank={args.rank} threads={threads} "
        f"steps={config['steps']}+{config['warmup']} warm-up, repeats={args.repeats}, "
        f"checkpointing={args.gradient_checkpointing}, mode: {config['mode']}",
        flush=True,
    )

    runs = []
    t_start = time.perf_counter()
    if args.in_process:
        os.environ["HF_HUB_OFFLINE"] = "1"
        runs = in_process(config)
        report(args, config, runs, time.perf_counter() - t_start)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        for rep in range(args.repeats):
            k = rep % len(args.variants)
            order = args.variants[k:] + args.variants[:k]  # round-robin, rotated each repeat
            for v in order:
                wcfg = dict(
                    config,
                    variant=v,
                    repeat=rep,
                    result_path=str(Path(tmp) / f"{v}-{rep}.json"),
                )
                cfg_path = Path(tmp) / f"cfg-{v}-{rep}.json"
                cfg_path.write_text(json.dumps(wcfg))
                env = dict(
                    os.environ,
                    HF_HUB_OFFLINE="1",
                    OMP_NUM_THREADS=str(threads),
                    MKL_NUM_THREADS=str(threads),
                    PYTHONHASHSEED=str(args.seed),
                )
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--worker",
                        str(cfg_path),
                    ],
                    env=env,
                    check=False,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"worker {v} repeat {rep} failed (exit {proc.returncode})")
                r = json.loads(Path(wcfg["result_path"]).read_text())
                runs.append(r)
                print(
                    f"  [{rep + 1}/{args.repeats}] {v:9s} step {r['median_step_s'] * 1e3:8.1f} ms  "
                    f"peak +{r['peak_increase_bytes'] / MIB:7.1f} MiB  "
                    f"saved {r['saved_activation_bytes'] / MIB:7.1f} MiB  "
                    f"trainable {r['trainable_params']:,}  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    total = time.perf_counter() - t_start
    report(args, config, runs, total)
    return 0


def report(
    args,
    config: dict,
    runs: list[dict],
    total: float,
    machine: dict | None = None,
    created: str | None = None,
) -> None:
    cuda = config["device"] == "cuda"
    per = summarise(runs, config["variants"])
    for method in ("lora", "dora"):
        a, b = per.get(f"ours-{method}"), per.get(f"peft-{method}")
        if a and b:
            assert a["trainable_params"] == b["trainable_params"], (
                f"{method}: trainable parameters differ, ours {a['trainable_params']} vs peft {b['trainable_params']}"
            )
            print(f"trainable parameters, {method}: ours {a['trainable_params']:,} == peft {b['trainable_params']:,}")
    codes = {json.dumps(r.get("code"), sort_keys=True) for r in runs}
    if len(codes) > 1:
        print(f"WARNING: the adapter code changed during the benchmark ({len(codes)} versions in the runs)")
    rat = ratios(per, runs)
    gl = goals(rat)
    table = markdown(per, config["device"])
    print()
    print(table)
    for k, x in rat.items():
        if x is not None:
            print(f"{k}: {x:.3f}")
    print()
    print("Goals (set for CPU medium):" if not (config["size"] == "medium" and not cuda) else "Goals:")
    for g in gl:
        ratio = "–" if g["ratio"] is None else f"{g['ratio']:.3f}"
        print(f"  {g['status']:4s}  {g['goal']}  (ratio {ratio})")
    print(f"\ntotal wall time: {total:.0f} s")

    result = {
        "machine": machine or machine_info(config["device"]),
        "config": config,
        "variants": per,
        "ratios": rat,
        "goals": gl,
        "runs": runs,
        "total_wall_s": total,
        "table_markdown": table,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
