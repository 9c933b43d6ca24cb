#!/usr/bin/env python
"""One whole training step of our trainer against diffusers' DreamBooth LoRA SDXL example script.

Compared, on the embedded tiny SDXL model (``dora_diffusion.models.embedded_model()``):

- ``ours-lora``, ``ours-dora``: ``dora-diffusion train --method lora|dora`` (run in-process through
  ``dora_diffusion.cli.main``);
- ``diffusers-lora``, ``diffusers-dora``: diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py``
  (PEFT LoRA on the UNet, ``--use_dora`` for DoRA).

Equal settings: the same images (those of ``--data``, copied to a scratch folder without caption sidecars,
because the diffusers script opens every file of its instance folder as an image), one instance prompt,
the model's native resolution (64 px), rank = alpha (``--rank``; the script fixes ``lora_alpha = rank``),
targets ``to_q, to_k, to_v, to_out.0`` of the UNet's attention (what the script adapts), batch size,
steps, threads, AdamW (lr 1e-4, weight decay 1e-4, betas 0.9/0.999, eps 1e-8), constant learning rate,
gradient clipping at 1.0, no text-encoder training, no prior preservation, no validation during
training (ours always makes validation images after the last step: here one, with one denoising step), no
checkpoints, fp32 on the CPU, TensorBoard logging in both (the script cannot turn its tracker off).
No horizontal flips (our ``--flip-p 0``; the script's ``--random_flip`` off) and random crops in both.
What each trainer still does differently per step is listed in the output (``DIFFERENCES``).

How a step is timed: each run is a fresh process (``--worker``) that wraps ``torch.optim.Optimizer.zero_grad``
(both trainers call it once per optimizer step, last thing in the step) and records the time and the
process's RSS after every call. A step's time is the interval between two consecutive ends of step, so
it holds everything the loop does per step (batch, VAE encode where it happens, forward, loss, backward,
clipping, AdamW, logging); setup before the first step and saving after the last are outside. The first
step has no interval; the next ``--warmup`` are dropped; a run's seconds per step is the median of the
remaining intervals. For ours the JSON also keeps the step times our trainer logs itself
(``train_log.jsonl`` ``step_seconds``: loop top to ``zero_grad``, without the logging), as a check.

Peak RSS: ``VmHWM`` of the worker process (``/proc/self/status``) at the end of the last step, i.e. the
process's peak through set-up and training (model loading included, the same model in both); also the
RSS at the end of the warm-up and the whole process's ``ru_maxrss`` at exit (with what each trainer
does after training: saving, and for the script a reload of the pipeline to load the LoRA weights).

Runs: variants alternate round-robin, the order rotated each repeat; reported figures are the medians
over ``--repeats`` runs (3 by default). JSON to ``benchmarks/results/`` with machine info (``machine_info``
of ``bench_adapters.py``), a Markdown table on stdout.

Setup for the diffusers script (kept out of this project's lock and pyproject):

1. The script is not in the diffusers wheel. Take ``examples/dreambooth/train_dreambooth_lora_sdxl.py``
   from the diffusers repository at the tag of the installed diffusers (``v0.42.1``) or any version whose
   ``check_min_version(...)`` is not above it, and save it outside this project, e.g.
   ``/tmp/dsrc/train_dreambooth_lora_sdxl.py``; pass it as ``--script``. A script that asks for a newer
   diffusers is run with that one check turned into a no-op (``--allow-newer-script``; recorded in the JSON).
2. It needs torchvision, which the lock lacks. Make a separate virtual environment that sees the
   project's packages and add torchvision for torch 2.13 (0.28.0) without dependencies::

       python3 -m venv /tmp/venv-db
       echo /work/main/.venv/lib/python3.11/site-packages \\
           > /tmp/venv-db/lib/python3.11/site-packages/project-venv.pth
       /tmp/venv-db/bin/pip install --no-deps torchvision==0.28.0

   and pass ``--script-python /tmp/venv-db/bin/python``. Where only a CUDA build of torchvision is at
   hand for a CPU torch, its compiled ops (``torchvision._C``: nms, roi_align, ...) cannot load and
   ``import torchvision`` fails registering them; the worker then imports torchvision without its two
   op-registration modules (the script uses only ``torchvision.transforms``). Recorded in the JSON.

Example (the reference measurement: median of 3, alternating, 50 timed steps, 1 thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_vs_diffusers.py \\
        --script /tmp/dsrc/train_dreambooth_lora_sdxl.py --script-python /tmp/venv-db/bin/python \\
        --steps 50 --warmup 3 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("ours-lora", "ours-dora", "diffusers-lora", "diffusers-dora")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SCRIPT_HELP = (
    "diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py, saved outside this project: it is not in "
    "the diffusers wheel; take it from the diffusers repository's examples/dreambooth folder at the tag of the "
    "installed diffusers (v{version})"
)

# What each trainer does per step, read from both codes (ours: dora_diffusion/train.py, batches.py,
# data.py, optim.py, losses.py; theirs: the script's main() training loop and DreamBoothDataset).
DIFFERENCES = [
    (
        "latents",
        "cached by default (--cache-latents): every image VAE-encoded once before the first step "
        "(mean + std * seeded noise), a step stacks cached latents; --no-cache-latents encodes per step",
        "VAE encode of the batch every step (vae.encode(...).latent_dist.sample()), under autograd's "
        "default grad mode (the VAE is frozen, so no graph is kept)",
    ),
    (
        "image transforms",
        "with cached latents none per step; without: resize, crop and flip of each example per step "
        "(seeded by image and epoch)",
        "none per step: resize, crop (and flip) done once for all images when the dataset is built; "
        "a step stacks the stored pixel tensors",
    ),
    (
        "data loading",
        "no DataLoader: indices from a seeded permutation, tensors from the cache",
        "torch DataLoader (shuffle, num_workers 0) prepared by accelerate (one batch fetched ahead)",
    ),
    (
        "text embeddings",
        "encoded once per distinct prompt before training (frozen encoders), looked up per step",
        "instance prompt encoded once before training and repeated per step (per step only with per-image captions)",
    ),
    (
        "SDXL time ids",
        "computed with the example (cached with the latents)",
        "built per step from each example's original size and crop (torch.tensor per example)",
    ),
    (
        "adapter",
        "our LoRA / DoRA layers (dora_diffusion.add_adapters); DoRA: factored, cached detached row norm, "
        "residual-tail recompute (memory saving)",
        "PEFT LoRA via unet.add_adapter(LoraConfig(..., init_lora_weights='gaussian', use_dora=...)); "
        "PEFT's DoRA recomputes the weight norm in every forward",
    ),
    (
        "batch size at epoch ends",
        "always --batch-size examples (seeded picks across epochs)",
        "DataLoader without drop_last: the last batch of an epoch is smaller when the batch size does not "
        "divide the image count (7 here: use batch 1 or 7 for equal work per step)",
    ),
    ("noise / timesteps", "seeded torch.Generator per step (CPU)", "global RNG (torch.randn_like / randint)"),
    ("noise offset", "off by default (--noise-offset 0)", "not available in this script"),
    ("SNR weighting", "off by default (--snr-gamma)", "off by default (--snr_gamma)"),
    ("loss", "MSE in fp32, .item() of the loss each step", "MSE in fp32, .item() of the loss each step"),
    (
        "gradient clipping",
        "accelerator.clip_grad_norm_ at --max-grad-norm 1.0",
        "accelerator.clip_grad_norm_ at --max_grad_norm 1.0",
    ),
    (
        "optimizer",
        "torch AdamW on the adapter parameters, zero_grad(set_to_none=True); lr schedule stepped by hand",
        "torch AdamW wrapped by accelerate (AcceleratedOptimizer), zero_grad(); lr scheduler prepared by accelerate",
    ),
    ("EMA", "none", "none"),
    (
        "validation",
        "every --validation-steps (off here: 0) and always at the end, after the last step (here one image, "
        "one denoising step)",
        "per epoch with --validation_prompt (not given here); after training it still reloads the VAE "
        "and the pipeline and loads the LoRA weights into it",
    ),
    (
        "logging per step",
        "tqdm, train_log.jsonl row, accelerator.log (TensorBoard)",
        "tqdm, accelerator.log (TensorBoard)",
    ),
    ("checkpoints", "off (--checkpoint-steps 0)", "every --checkpointing_steps (set beyond the run)"),
    ("gradient accumulation", "own loop over micro-batches", "accelerator.accumulate(unet)"),
]


# --------------------------------------------------------------------------------------------------
# worker: one trainer run in this process, with the step hook


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class StepRecorder:
    """Wraps ``torch.optim.Optimizer.zero_grad``: the time and RSS after each call, the trained count."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.rss_kb: list[int | None] = []
        self.hwm_kb: list[int | None] = []
        self.trainable_parameters: int | None = None

    def install(self) -> None:
        import torch

        original = torch.optim.Optimizer.zero_grad
        recorder = self

        @functools.wraps(original)  # keeps its signature: accelerate inspects it for set_to_none
        def zero_grad(opt, *args, **kwargs):
            out = original(opt, *args, **kwargs)
            if recorder.trainable_parameters is None:
                recorder.trainable_parameters = sum(p.numel() for g in opt.param_groups for p in g["params"])
            recorder.ends.append(time.perf_counter())
            recorder.rss_kb.append(_status_kb("VmRSS"))
            recorder.hwm_kb.append(_status_kb("VmHWM"))
            return out

        torch.optim.Optimizer.zero_grad = zero_grad


def _required_min_version(script: Path) -> str | None:
    m = re.search(r'^check_min_version\(\s*"([^"]+)"\s*\)', script.read_text(encoding="utf-8"), re.M)
    return m.group(1) if m else None


def _import_torchvision() -> str:
    """Import torchvision; where its compiled ops cannot load (a CUDA build beside a CPU torch), import it
    without the two modules that register those ops. Returns how it was imported."""
    try:
        import torchvision  # noqa: F401

        return "plain"
    except ImportError:
        return "absent"
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import types

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401,F811
    from torchvision import transforms  # noqa: F401

    return "without torchvision._meta_registrations and _autograd_registrations (torchvision._C not loadable)"


def ours_argv(a: argparse.Namespace, method: str, data: Path, output: Path) -> list[str]:
    return [
        "train",
        "--data", str(data),
        "--prompt", a.prompt,
        "--output", str(output),
        "--model", a.model,
        "--resolution", str(a.resolution),
        "--method", method,
        "--rank", str(a.rank),
        "--alpha", str(a.rank),
        "--targets", ",".join(TARGETS),
        "--dropout", "0",
        "--no-train-text-encoder",
        "--max-steps", str(a.total_steps),
        "--batch-size", str(a.batch_size),
        "--gradient-accumulation", "1",
        "--learning-rate", "1e-4",
        "--lr-schedule", "constant",
        "--lr-warmup-steps", "0",
        "--weight-decay", "1e-4",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.999",
        "--adam-epsilon", "1e-8",
        "--max-grad-norm", "1.0",
        "--noise-offset", "0",
        "--mixed-precision", "no",
        "--no-gradient-checkpointing",
        "--cache-latents" if a.ours_cache_latents else "--no-cache-latents",
        "--no-center-crop",
        "--flip-p", "0",
        "--seed", str(a.seed),
        "--validation-steps", "0",
        "--num-validation-images", "1",  # at least 1: one image, one denoising step, after the last step
        "--validation-inference-steps", "1",
        "--checkpoint-steps", "0",
        "--report-to", "tensorboard",
        "--log-every", "1",
        "--threads", str(a.threads),
    ]  # fmt: skip


def diffusers_argv(a: argparse.Namespace, dora: bool, data: Path, output: Path) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", a.model,
        "--instance_data_dir", str(data),
        "--instance_prompt", a.prompt,
        "--output_dir", str(output),
        "--resolution", str(a.resolution),
        "--train_batch_size", str(a.batch_size),
        "--max_train_steps", str(a.total_steps),
        "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-4",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--optimizer", "AdamW",
        "--adam_weight_decay", "1e-4",
        "--adam_beta1", "0.9",
        "--adam_beta2", "0.999",
        "--adam_epsilon", "1e-8",
        "--max_grad_norm", "1.0",
        "--rank", str(a.rank),
        "--lora_dropout", "0",
        "--mixed_precision", "no",
        "--dataloader_num_workers", "0",
        "--checkpointing_steps", str(10**9),
        "--report_to", "tensorboard",
        "--seed", str(a.seed),
    ]  # fmt: skip
    return argv + (["--use_dora"] if dora else [])


def worker(a: argparse.Namespace) -> int:
    import runpy

    import torch

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(a.threads)
    except RuntimeError:
        pass
    recorder = StepRecorder()
    recorder.install()
    out = Path(a.worker_out)
    data, output = Path(a.worker_data), Path(a.worker_output)
    result: dict = {"variant": a.worker, "threads_torch": torch.get_num_threads(), "error": None}
    started = time.perf_counter()
    try:
        if a.worker.startswith("ours-"):
            from dora_diffusion.cli import main as cli_main

            argv = ours_argv(a, a.worker.removeprefix("ours-"), data, output)
            result["argv"] = ["dora-diffusion", *argv]
            rc = cli_main(argv)
            if rc:
                raise RuntimeError(f"dora-diffusion train exited {rc}")
        else:
            script = Path(a.script)
            result["torchvision_import"] = a.torchvision_import
            import diffusers
            import diffusers.utils
            from packaging.version import Version

            required = _required_min_version(script)
            neutralised = bool(required and Version(required) > Version(diffusers.__version__))
            if neutralised:
                if not a.allow_newer_script:
                    raise RuntimeError(
                        f"{script} asks for diffusers >= {required}, installed {diffusers.__version__}: use a "
                        "version of the script for the installed diffusers, or --allow-newer-script"
                    )
                diffusers.utils.check_min_version = lambda *args, **kwargs: None
            result["check_min_version"] = {
                "required": required,
                "installed": diffusers.__version__,
                "neutralised": neutralised,
            }
            argv = diffusers_argv(a, a.worker == "diffusers-dora", data, output)
            result["argv"] = [str(script), *argv]
            sys.argv = [str(script), *argv]
            runpy.run_path(str(script), run_name="__main__")
    except BaseException as exc:  # noqa: BLE001 - recorded; the steps measured so far are still reported
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["wall_seconds"] = time.perf_counter() - started
    ends = recorder.ends
    result["steps_done"] = len(ends)
    result["step_seconds"] = [b - e for e, b in zip(ends, ends[1:], strict=False)]  # step k+1 (k >= 1)
    result["rss_kb_after_step"] = recorder.rss_kb
    result["hwm_kb_after_step"] = recorder.hwm_kb
    result["trainable_parameters"] = recorder.trainable_parameters
    if a.worker.startswith("ours-"):
        log = output / "train_log.jsonl"
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            result["logged_step_seconds"] = [r["step_seconds"] for r in rows if "step_seconds" in r]
    result["ru_maxrss_kb_at_exit"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write_text(json.dumps(result))
    return 0 if result["error"] is None else 1


# --------------------------------------------------------------------------------------------------
# driver


def prepare_images(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True)
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise SystemExit(f"--data {src}: no images")
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return names


def run_one(a: argparse.Namespace, variant: str, data: Path, scratch: Path, index: int) -> dict:
    out = scratch / f"{index:02d}-{variant}.json"
    output = scratch / f"{index:02d}-{variant}-output"
    python = sys.executable if variant.startswith("ours-") else a.script_python
    cmd = [
        python, str(Path(__file__).resolve()),
        "--worker", variant,
        "--worker-out", str(out),
        "--worker-data", str(data),
        "--worker-output", str(output),
        "--script", str(a.script),
        "--model", a.model,
        "--prompt", a.prompt,
        "--resolution", str(a.resolution),
        "--rank", str(a.rank),
        "--batch-size", str(a.batch_size),
        "--steps", str(a.steps),
        "--warmup", str(a.warmup),
        "--threads", str(a.threads),
        "--seed", str(a.seed),
    ]  # fmt: skip
    cmd += ["--ours-cache-latents" if a.ours_cache_latents else "--no-ours-cache-latents"]
    if a.allow_newer_script:
        cmd.append("--allow-newer-script")
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(scratch / f"{index:02d}-{variant}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=scratch)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    rc = os.waitstatus_to_exitcode(status)
    res = json.loads(out.read_text()) if out.exists() else {"variant": variant, "error": f"worker exited {rc}"}
    res.update(
        exit_code=rc,
        process_wall_seconds=wall,
        process_cpu_seconds=usage.ru_utime + usage.ru_stime,
        process_ru_maxrss_kb=usage.ru_maxrss,
        load_1min_before=load_before,
        load_1min_after=os.getloadavg()[0],
        log=str(scratch / f"{index:02d}-{variant}.log"),
    )
    timed = res.get("step_seconds", [])[a.warmup :]
    res["timed_step_seconds"] = timed
    res["seconds_per_step"] = statistics.median(timed) if timed else None
    hwm = [h for h in res.get("hwm_kb_after_step", []) if h is not None]
    rss = res.get("rss_kb_after_step", [])
    res["peak_rss_mb"] = hwm[-1] / 1024 if hwm else None
    res["rss_after_warmup_mb"] = rss[a.warmup] / 1024 if len(rss) > a.warmup and rss[a.warmup] else None
    logged = res.get("logged_step_seconds", [])[a.warmup + 1 :]
    res["logged_seconds_per_step"] = statistics.median(logged) if logged else None
    if res.get("error") or len(timed) < a.steps:
        print(f"  {variant}: FAILED ({res.get('error')}; {len(timed)} timed steps); log {res['log']}", flush=True)
    return res


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(a: argparse.Namespace, runs: list[dict]) -> dict:
    out = {}
    for v in a.variants:
        rs = [r for r in runs if r["variant"] == v]
        out[v] = {
            "runs": len(rs),
            "failed": sum(1 for r in rs if r.get("error") or r.get("seconds_per_step") is None),
            "seconds_per_step": _median([r.get("seconds_per_step") for r in rs]),
            "seconds_per_step_runs": [r.get("seconds_per_step") for r in rs],
            "logged_seconds_per_step": _median([r.get("logged_seconds_per_step") for r in rs]),
            "peak_rss_mb": _median([r.get("peak_rss_mb") for r in rs]),
            "peak_rss_mb_runs": [r.get("peak_rss_mb") for r in rs],
            "rss_after_warmup_mb": _median([r.get("rss_after_warmup_mb") for r in rs]),
            "process_ru_maxrss_mb": _median([(r.get("process_ru_maxrss_kb") or 0) / 1024 or None for r in rs]),
            "process_wall_seconds": _median([r.get("process_wall_seconds") for r in rs]),
            "trainable_parameters": next(
                (r["trainable_parameters"] for r in rs if r.get("trainable_parameters")), None
            ),
        }
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(a: argparse.Namespace, summary: dict) -> str:
    lines = [
        f"One training step, embedded tiny SDXL at {a.resolution} px, batch {a.batch_size}, rank {a.rank}, "
        f"{a.threads} thread(s); median of {a.repeats} runs x {a.steps} timed steps (after {a.warmup} warm-up); "
        f"ours with cached latents: {'yes' if a.ours_cache_latents else 'no'}",
        "",
        "| variant | s/step | vs diffusers same method | peak RSS MB (to last step) | RSS after warm-up MB | "
        "ru_maxrss at exit MB | process wall s | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in a.variants:
        s = summary[v]
        method = v.split("-", 1)[1]
        ref = summary.get(f"diffusers-{method}", {}).get("seconds_per_step")
        ratio = s["seconds_per_step"] / ref if s["seconds_per_step"] and ref and v.startswith("ours-") else None
        lines.append(
            f"| {v} | {_fmt(s['seconds_per_step'], '.4f')} | {_fmt(ratio, '.2f') + 'x' if ratio else ''} | "
            f"{_fmt(s['peak_rss_mb'], '.0f')} | {_fmt(s['rss_after_warmup_mb'], '.0f')} | "
            f"{_fmt(s['process_ru_maxrss_mb'], '.0f')} | {_fmt(s['process_wall_seconds'], '.1f')} | "
            f"{s['trainable_parameters'] if s['trainable_parameters'] is not None else 'n/a'} |"
        )
    return "\n".join(lines)


def differences_md() -> str:
    lines = ["| per step | ours (dora-diffusion train) | diffusers train_dreambooth_lora_sdxl.py |", "|---|---|---|"]
    lines += [f"| {what} | {ours} | {theirs} |" for what, ours, theirs in DIFFERENCES]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--script", type=Path, help=SCRIPT_HELP.format(version=diffusers.__version__) + " (required)")
    p.add_argument(
        "--script-python",
        default=sys.executable,
        help="Python that runs the script: one with torchvision (see the module docstring). Default: this one.",
    )
    p.add_argument("--allow-newer-script", action="store_true", help="Run a script whose check_min_version asks "
                   "for a newer diffusers, with only that check made a no-op (recorded).")  # fmt: skip
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--data", type=Path, default=REPO_ROOT / "datasets" / "sks_toy")
    p.add_argument("--prompt", default="a photo of sks toy")
    p.add_argument("--model", default=None, help="Model folder. Default: the embedded tiny model.")
    p.add_argument("--resolution", type=int, default=None, help="Default: the model's native size.")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="Timed steps per run.")
    p.add_argument("--warmup", type=int, default=3, help="Steps after the first dropped from the timing.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ours-cache-latents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Our trainer with its latent cache (its default), or encoding every step as the script does.",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file. Default: benchmarks/results/vs-diffusers-<time>.json"
    )
    p.add_argument("--keep-scratch", action="store_true", help="Keep the runs' folders and logs.")
    # worker (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-data", help=argparse.SUPPRESS)
    p.add_argument("--worker-output", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.script is None:
        p.error("--script PATH is required: " + SCRIPT_HELP.format(version=diffusers.__version__))
    if not a.script.is_file():
        p.error(f"--script {a.script}: no such file. " + SCRIPT_HELP.format(version=diffusers.__version__))
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if bad := [v for v in a.variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if a.model is None:
        from dora_diffusion.models import embedded_model

        a.model = str(embedded_model())
    if a.resolution is None:
        from dora_diffusion.models import native_resolution

        a.resolution = native_resolution(a.model)
    a.total_steps = 1 + a.warmup + a.steps
    return a


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--probe" in args:  # can this interpreter run the script? (torchvision first: transformers imports it)
        print(_import_torchvision())
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        return 0
    torchvision_import = _import_torchvision() if "--worker" in args else None
    a = parse_args(args)
    if a.worker:
        a.torchvision_import = torchvision_import
        return worker(a)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_adapters import machine_info

    if any(v.startswith("diffusers-") for v in a.variants):
        probe = subprocess.run(
            [a.script_python, str(Path(__file__).resolve()), "--probe"],
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
            },
        )
        if probe.returncode:
            raise SystemExit(f"--script-python {a.script_python} cannot import the script's needs:\n{probe.stderr}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-vs-diffusers-"))
    data = scratch / "images"
    images = prepare_images(a.data, data)
    print(
        f"{len(images)} images of {a.data} (caption sidecars left out), {a.resolution} px, rank {a.rank}, "
        f"batch {a.batch_size}, {a.steps} timed + {a.warmup} warm-up + 1 steps, {a.threads} thread(s), "
        f"{a.repeats} repeats; scratch {scratch}",
        flush=True,
    )
    runs: list[dict] = []
    index = 0
    for rep in range(a.repeats):
        order = a.variants[rep % len(a.variants) :] + a.variants[: rep % len(a.variants)]
        for v in order:
            r = run_one(a, v, data, scratch, index)
            r["repeat"] = rep
            runs.append(r)
            index += 1
            print(
                f"  repeat {rep + 1}/{a.repeats} {v}: {_fmt(r['seconds_per_step'], '.4f')} s/step, "
                f"peak RSS {_fmt(r['peak_rss_mb'], '.0f')} MB, process {r['process_wall_seconds']:.1f} s",
                flush=True,
            )
    summary = summarise(a, runs)
    text = table(a, summary)
    print()
    print(text)
    print()
    print("What each trainer does per step differently:")
    print()
    print(differences_md())
    diffusers_run = next((r for r in runs if r["variant"].startswith("diffusers-")), {})
    result = {
        "benchmark": "bench_vs_diffusers",
        "machine": machine_info("cpu"),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(a).items()
            if not k.startswith("worker") and k != "keep_scratch"
        },
        "images": images,
        "targets": TARGETS,
        "timing": (
            "interval between consecutive ends of torch.optim.Optimizer.zero_grad (one per optimizer step) in a "
            "fresh process per run; the first step has no interval, the next `warmup` are dropped; per-run median"
        ),
        "peak_rss": "VmHWM of the worker process at the end of the last step (set-up included)",
        "script": {
            "path": str(a.script),
            "python": a.script_python,
            "check_min_version": diffusers_run.get("check_min_version"),
            "torchvision_import": diffusers_run.get("torchvision_import"),
        },
        "summary": summary,
        "runs": runs,
        "differences": [{"what": w, "ours": o, "diffusers": t} for w, o, t in DIFFERENCES],
        "table_markdown": text,
    }
    out = a.out or REPO_ROOT / "benchmarks" / "results" / f"vs-diffusers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {out}")
    if not a.keep_scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(s["failed"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
