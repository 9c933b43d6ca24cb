"""The DreamBooth loop: LoRA, DoRA or magnitude-only adapters on SDXL, or full fine-tuning of the layers they
would adapt (``full``), with accelerate underneath.

``train(config)`` reads top to bottom: set up, load, adapt, cache, then one optimizer step per loop
iteration, with validation images and checkpoints on the way, and the adapter, the resolved config
and a model card at the end. SDXL specifics (prompt encoding, data order, seeded noise) are the small
pure helpers above it; the loss (target, min-SNR weights) is ``losses``.

Reproducibility: every random draw comes from a generator keyed on (seed, step, rank) or
(seed, image), never from hidden global state, except dropout, whose global RNG state is saved in
checkpoints. So N steps + resume + N steps gives exactly the adapter of 2N steps straight.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import runs
from .config import ConfigError, TrainConfig
from .data import SubjectDataset, collate_examples, scan_subject_folder
from .full import (
    FULL,
    load_tuned_state_dict,
    save_tuned_components,
    tune_layers,
    tuned_parameters,
    tuned_state_dict,
    tuned_summary,
)
from .inject import adapter_parameters, adapter_state_dict, adapter_summary, add_adapters, load_adapter_state_dict
from .losses import diffusion_loss, loss_weights, training_target

# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``keys`` (independent streams per step, rank, image)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator("cpu").manual_seed(seed)


def batch_indices(seed: int, micro_step: int, rank: int, world: int, batch_size: int, n: int) -> list[tuple[int, int]]:
    """``(image index, epoch)`` pairs of one rank's micro-batch: epochs are seeded permutations of the
    data, consumed in order by all ranks together, so the order depends only on the step."""
    out = []
    for j in range(batch_size):
        position = (micro_step * world + rank) * batch_size + j
        epoch, k = divmod(position, n)
        perm = torch.randperm(n, generator=seeded_generator(seed, 1, epoch))
        out.append((int(perm[k]), epoch))
    return out


def encode_prompts(text_encoders, tokenizers, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: both encoders' penultimate hidden states, concatenated; te2's pooled output."""
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # te2 (the last): projected pooled output, [B, projection_dim]
    return torch.cat(states, dim=-1), pooled


# --------------------------------------------------------------------------------------------
# Output folder, checkpoints
# --------------------------------------------------------------------------------------------


def prepare_output(config: TrainConfig) -> Path:
    """Refuse to write into a non-empty folder unless resuming or told to overwrite."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {out} exists and is not a folder")
    if (
        out.exists()
        and any(p.name != runs.LOCK_NAME for p in out.iterdir())
        and not config.resume
        and not config.overwrite
    ):
        raise ConfigError(
            f"output: {out} already exists and is not empty; use --resume latest to continue it, "
            "another --output, or --overwrite to write into it anyway"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def output_lock(output: str | Path) -> Iterator[None]:
    """Hold ``<output>/.train.lock`` (created exclusively, holding our pid) while a run writes there, so a
    second run into the same folder stops at once. A lock whose process is gone (killed) is taken over.
    Released on the way out, errors included; a folder this made and nothing filled is removed again.
    Under several processes rank 0 holds it for all (they share the folder)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {out} exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / runs.LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = lock.read_text(errors="replace").strip()
            pid = int(text) if text.isdigit() else None
            if pid is None or _pid_alive(pid):  # unreadable: maybe being written; assume it is held
                raise ConfigError(
                    f"output: {out} is in use by another training run (pid {pid if pid else '?'}, lock file {lock}); "
                    "wait for it to end or choose another --output (if no run is going, delete the lock file)"
                ) from None
            print(f"output: taking over the lock of process {pid} in {out}: that process is no longer running")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise ConfigError(f"output: {out} is in use by another training run that is just starting (lock file {lock})")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: a run refused before writing anything leaves no folder


def find_checkpoint(output: Path, resume: str) -> Path:
    """The checkpoint ``resume`` names: ``latest`` (the run's newest complete one) or a checkpoint folder."""
    if resume != "latest":
        path = Path(resume)
        if not runs.is_checkpoint(path):
            raise ConfigError(f"resume: {path} is not a checkpoint folder (no {runs.STATE_NAME})")
        return path
    found = runs.latest_checkpoint(output)
    if found is None:
        raise ConfigError(f"resume: no checkpoint in {output / runs.CHECKPOINT_DIR}")
    return found


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator, output: Path, step: int, modules: dict, optimizer, lr_scheduler, config: TrainConfig
) -> Path:
    """Adapter weights, optimizer, schedule, RNG states and step, written to a temporary folder and
    renamed into place: a kill mid-write leaves the previous checkpoint intact."""
    final, tmp = runs.checkpoint_dir(output, step), runs.checkpoint_staging_dir(output, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), runs.rng_file(tmp, accelerator.process_index))
    if accelerator.is_main_process:
        trained = {c: trainable_state_dict(accelerator.unwrap_model(m), config.method) for c, m in modules.items()}
        runs.write_checkpoint_tensors(tmp / checkpoint_weights_name(config.method), trained)
        torch.save(optimizer.state_dict(), tmp / runs.OPTIMIZER_NAME)
        torch.save(lr_scheduler.state_dict(), tmp / runs.SCHEDULER_NAME)
        runs.write_checkpoint_state(tmp, step, config.to_dict())  # last: a folder with it is complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if config.checkpoints_total_limit:
            for old in runs.checkpoints(output)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, modules: dict, optimizer, lr_scheduler, config: TrainConfig) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; returns its step."""
    state = runs.read_checkpoint_state(path)
    saved = state["config"]
    for key in ("method", "rank", "alpha", "targets", "train_text_encoder", "model"):
        if saved.get(key) != getattr(config, key):
            raise ConfigError(
                f"resume: {key} is {getattr(config, key)!r} but checkpoint {path} was trained with {saved.get(key)!r}"
            )
    adapter = path / checkpoint_weights_name(config.method)
    by_component = runs.read_checkpoint_tensors(adapter)
    load = load_tuned_state_dict if config.method == FULL else load_adapter_state_dict
    for comp, module in modules.items():
        load(accelerator.unwrap_model(module), by_component.get(comp, {}), source=f"{adapter} ({comp})")
    # Our own files, loaded without unpickling code (weights_only).
    optimizer.load_state_dict(torch.load(path / runs.OPTIMIZER_NAME, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / runs.SCHEDULER_NAME, weights_only=True))
    rng = runs.rng_file(path, accelerator.process_index)
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))  # numpy/python states are tuples, our file
    return int(state["step"])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output: Path
    adapter_file: Path | None  # the adapter (a checkpoint folder when stopped); None for full fine-tuning
    steps: int
    final_loss: float
    median_step_seconds: float
    trainable_parameters: int
    validation_images: list[Path] = field(default_factory=list)
    stopped: bool = False
    tuned_components: list[Path] = field(default_factory=list)  # full fine-tuning: <run>/unet, ...


def trainable_state_dict(module: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """What a run trains in ``module``: its adapters' parameters, or (``full``) its tuned layers' weights."""
    return tuned_state_dict(module) if method == FULL else adapter_state_dict(module)


def checkpoint_weights_name(method: str) -> str:
    return runs.CHECKPOINT_WEIGHTS_NAME if method == FULL else runs.CHECKPOINT_ADAPTER_NAME


def adapter_checksum(modules: dict, method: str = "") -> float:
    """A float that differs when any trained weight differs (replicas under DDP must agree)."""
    total = 0.0
    for _, m in sorted(modules.items()):
        for i, (_, v) in enumerate(sorted(trainable_state_dict(m, method).items())):
            total += float((v.double().flatten() * torch.linspace(1, 2, v.numel(), dtype=torch.float64)).sum()) * (
                i + 1
            )
    return total


class StepReport(NamedTuple):
    """What ``train``'s ``progress`` callback is given after every optimizer step, and once more at the end
    with the final validation images (``seconds`` is ``None`` there: no step was taken)."""

    step: int
    loss: float
    seconds: float | None
    """The step's wall time (validation and checkpoints not included)."""
    images: tuple[Path, ...] = ()
    """Validation images written at this step."""


def train(
    config: TrainConfig,
    should_stop: Callable[[int, float], bool] | None = None,
    progress: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Train as ``config`` says. ``should_stop(step, loss)`` is asked after every step; when it answers
    True the run checkpoints and stops cleanly (``TrainResult.stopped``), resumable with ``resume``.
    ``progress(StepReport)`` is told every step's loss and time and the validation images (main process).
    One run at a time per output folder (``output_lock``)."""
    with output_lock(config.output):
        return _train(config, should_stop, progress)


def _train(
    config: TrainConfig,
    should_stop: Callable[[int, float], bool] | None,
    progress: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .card import write_model_card
    from .formats import save_adapter
    from .formats.comfyui import save_comfyui
    from .models import load_pipeline, model_folder, native_resolution, resolve_model

    # ---- set-up: refuse bad options and folders before anything heavy
    if not config.data or not config.prompt:
        raise ConfigError("data and prompt: both are required (--data DIR --prompt 'a photo of sks toy')")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    output = prepare_output(config)
    resume_from = find_checkpoint(output, config.resume) if config.resume else None
    if resume_from is not None and (at := runs.checkpoint_step(resume_from)) > config.max_steps:
        raise ConfigError(
            f"max_steps: {config.max_steps} is below the step of checkpoint {resume_from} (step {at}); "
            f"max_steps is the total to train to, so resume with --max-steps {at} or more"
        )
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_world == 1:
        # accelerate keeps its state per process: a second run in the same process (the app, `compare`)
        # with other settings (mixed precision) would be refused. A single process can start afresh.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        # Launched as several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without
        # CUDA: form a gloo process group on the CPU rather than run independent copies.
        cpu=launched_world > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / runs.LOGS_DIR)),
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if launched_world != world:
        raise ConfigError(
            f"launch: WORLD_SIZE={launched_world} but accelerate formed {world} process(es); "
            "these processes would overwrite each other's output"
        )
    torch.manual_seed(config.seed + rank)  # dropout; everything else has its own generator
    np.random.seed(config.seed + rank)
    random.seed(config.seed + rank)

    # ---- data: checked and summarised before the model is loaded
    model_dir = model_folder(resolve_model(config.model))
    resolution = config.resolution or native_resolution(model_dir)
    report = scan_subject_folder(config.data, resolution)
    if accelerator.is_main_process:
        print(report.summary())
    pipe = load_pipeline(str(model_dir))
    dataset = SubjectDataset(
        report, config.prompt, resolution, center_crop=config.center_crop, flip_p=config.flip_p, seed=config.seed
    )

    # ---- prior preservation: class images generated by the base model when too few are on disk
    class_dataset = None
    if config.class_prompt:
        class_dir = Path(config.class_data) if config.class_data else runs.class_images_dir(output, config.class_prompt)
        if accelerator.is_main_process:
            generate_class_images(
                pipe.to(device), class_dir, config.class_prompt, config.num_class_images, resolution, config
            )
        accelerator.wait_for_everyone()
        class_report = scan_subject_folder(class_dir, resolution)
        class_report.used = sorted(class_report.used, key=lambda r: r.path.name)[: config.num_class_images]
        class_dataset = SubjectDataset(
            class_report,
            config.class_prompt,
            resolution,
            center_crop=config.center_crop,
            flip_p=config.flip_p,
            seed=config.seed + 1,
        )

    # ---- models: frozen base in the compute dtype, fp32 adapters on top
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    unet, vae = pipe.unet, pipe.vae
    text_encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
    modules: dict[str, torch.nn.Module] = {"unet": unet}
    if config.train_text_encoder:
        modules.update(zip(("text_encoder", "text_encoder_2"), text_encoders, strict=True))
    for m in (unet, *text_encoders):
        if config.method == FULL and any(m is t for t in modules.values()):
            tune_layers(m, config.targets, device=device, dtype=weight_dtype)  # its targeted layers train, in fp32
        else:
            m.to(device) if weight_dtype == torch.float32 else m.to(device, dtype=weight_dtype)
    vae.to(device)  # loaded in fp32 and kept there: SDXL's VAE overflows in fp16
    if config.method != FULL:
        adapter_cfg = config.adapter_config()
        for m in modules.values():
            add_adapters(m, adapter_cfg)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    summary_of = tuned_summary if config.method == FULL else adapter_summary
    n_trainable = sum(summary_of(m)["trainable_parameters"] for m in modules.values())
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # ---- caches: text embeddings when the encoders are frozen, VAE latents when asked
    prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if not config.train_text_encoder:
        prompts = {dataset.example(i, 0)["prompt"] for i in range(len(dataset))}
        if class_dataset is not None:
            prompts.add(config.class_prompt)
        with torch.no_grad():
            for p in sorted(prompts):
                embeds, pooled = encode_prompts(text_encoders, tokenizers, [p], device)
                prompt_cache[p] = (embeds[0], pooled[0])

    def encode_images(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, torch.float32)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(device)
            return (dist.mean + dist.std * noise) * vae.config.scaling_factor

    # (latent, prompt, time ids) per image: the pixels are not kept once encoded
    latent_cache: dict[tuple[str, int], tuple[torch.Tensor, str, torch.Tensor]] = {}
    if config.cache_latents:
        for tag, ds in (("instance", dataset), ("class", class_dataset)):
            for i in range(len(ds) if ds is not None else 0):
                b = collate_examples([ds.example(i, 0)])
                latent = encode_images(b["pixel_values"], seeded_generator(config.seed, 2, i, tag == "class"))[0].cpu()
                latent_cache[(tag, i)] = (latent, b["prompts"][0], b["add_time_ids"][0])

    def make_batch(
        tag: str, ds, picks: list[tuple[int, int]], gen: torch.Generator
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        if config.cache_latents:
            entries = [latent_cache[(tag, i)] for i, _ in picks]
            latents = torch.stack([e[0] for e in entries]).to(device)
            return latents, [e[1] for e in entries], torch.stack([e[2] for e in entries]).to(device)
        batch = collate_examples([ds.example(i, epoch) for i, epoch in picks])
        return encode_images(batch["pixel_values"], gen), batch["prompts"], batch["add_time_ids"].to(device)

    # ---- optimizer and schedule (stepped once per optimizer step; not handed to accelerate)
    parameters_of = tuned_parameters if config.method == FULL else adapter_parameters
    groups = [{"params": parameters_of(unet), "lr": config.learning_rate}]
    if config.train_text_encoder:
        te_params = [p for te in text_encoders for p in parameters_of(te)]
        groups.append({"params": te_params, "lr": config.text_encoder_lr or config.learning_rate})
    optimizer_cls = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)") from None
        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(
        groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, weight_decay=config.weight_decay
    )
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    prepared = accelerator.prepare(*modules.values(), optimizer)
    modules = dict(zip(modules, prepared[:-1], strict=True))
    unet, optimizer = modules["unet"], prepared[-1]
    if config.train_text_encoder:
        text_encoders = [modules["text_encoder"], modules["text_encoder_2"]]

    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(accelerator, resume_from, modules, optimizer, lr_scheduler, config)
        if accelerator.is_main_process:
            runs.truncate_log(output, start_step)  # one row per step, steps increasing
            print(f"resumed from {resume_from} at step {start_step}")
    if accelerator.is_main_process:
        if config.report_to != "none":
            accelerator.init_trackers(
                "dora-diffusion",
                config={
                    k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()
                },
            )
        runs.write_run_config(
            output,
            {**config.to_dict(), "resolution": resolution, "trainable_parameters": n_trainable, "num_processes": world},
        )
        print(
            f"training {config.method} ({'' if config.method == FULL else f'rank {config.rank}, '}"
            f"targets {config.targets!r}) on {len(dataset)} images: "
            f"{n_trainable:,} trainable parameters, {config.max_steps} steps"
        )
        for comp, m in modules.items():
            if config.method == FULL:
                counts = tuned_summary(accelerator.unwrap_model(m))
                print(f"  {comp}: full on {counts['layers']} layers, {counts['trainable_parameters']:,} parameters")
                continue
            for method, counts in adapter_summary(accelerator.unwrap_model(m))["per_method"].items():
                print(f"  {comp}: {method} on {counts['layers']} layers, {counts['trainable_parameters']:,} parameters")

    # ---- the loop: one iteration = one optimizer step
    step_times: list[float] = []
    validation_images: list[Path] = []
    loss_value = float("nan")
    bar = tqdm(total=config.max_steps, initial=start_step, disable=not accelerator.is_main_process, desc=config.method)
    for step in range(start_step, config.max_steps):
        started = time.perf_counter()
        for m in modules.values():
            m.train()
        loss_sum = 0.0
        for micro in range(config.gradient_accumulation):
            micro_step = step * config.gradient_accumulation + micro
            gen = seeded_generator(config.seed, 3, micro_step, rank)
            # batch: instance examples, then as many class examples (prior preservation)
            latents, prompts, time_ids = make_batch(
                "instance",
                dataset,
                batch_indices(config.seed, micro_step, rank, world, config.batch_size, len(dataset)),
                gen,
            )
            if class_dataset is not None:
                c_lat, c_prompts, c_ids = make_batch(
                    "class",
                    class_dataset,
                    batch_indices(config.seed + 1, micro_step, rank, world, config.batch_size, len(class_dataset)),
                    gen,
                )
                latents, prompts, time_ids = (
                    torch.cat([latents, c_lat]),
                    prompts + c_prompts,
                    torch.cat([time_ids, c_ids]),
                )
            # noise and timesteps
            noise = torch.randn(latents.shape, generator=gen).to(device)
            if config.noise_offset:
                noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(device)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen
            ).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            # conditioning
            if prompt_cache:
                embeds = torch.stack([prompt_cache[p][0] for p in prompts])
                pooled = torch.stack([prompt_cache[p][1] for p in prompts])
            else:
                embeds, pooled = encode_prompts(text_encoders, tokenizers, prompts, device)
            sync = micro == config.gradient_accumulation - 1
            ctx = accelerator.no_sync(unet) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                pred = unet(
                    noisy.to(weight_dtype),
                    timesteps,
                    embeds.to(weight_dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids.to(weight_dtype)},
                ).sample
                target = training_target(noise_scheduler, latents, noise, timesteps)
                if class_dataset is not None:
                    pred, prior_pred = pred.chunk(2)
                    target, prior_target = target.chunk(2)
                    t_inst, t_prior = timesteps.chunk(2)
                    loss = diffusion_loss(pred, target, loss_weights(noise_scheduler, t_inst, config.snr_gamma))
                    loss = loss + config.prior_loss_weight * diffusion_loss(
                        prior_pred, prior_target, loss_weights(noise_scheduler, t_prior, config.snr_gamma)
                    )
                else:
                    loss = diffusion_loss(pred, target, loss_weights(noise_scheduler, timesteps, config.snr_gamma))
                accelerator.backward(loss / config.gradient_accumulation)
            loss_sum += loss.detach().float().item()
        # optimizer step
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum / config.gradient_accumulation
        elapsed = time.perf_counter() - started
        step_times.append(elapsed)
        done = step + 1
        # logs
        lr = lr_scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if accelerator.is_main_process and (done % config.log_every == 0 or done == config.max_steps):
            runs.append_log(output, {"step": done, "loss": loss_value, "lr": lr, "step_seconds": elapsed})
            accelerator.log({"loss": loss_value, "lr": lr, "step_seconds": elapsed}, step=done)
        # validation and checkpoints
        images: list[Path] = []
        if config.validation_steps and done % config.validation_steps == 0 and done != config.max_steps:
            images = run_validation(accelerator, pipe, modules, text_encoders, config, output, done)
            validation_images += images
        if config.checkpoint_steps and done % config.checkpoint_steps == 0:
            save_checkpoint(accelerator, output, done, modules, optimizer, lr_scheduler, config)
        if progress is not None and accelerator.is_main_process:
            progress(StepReport(done, loss_value, elapsed, tuple(images)))
        if should_stop is not None and done < config.max_steps and should_stop(done, loss_value):
            if not (config.checkpoint_steps and done % config.checkpoint_steps == 0):
                save_checkpoint(accelerator, output, done, modules, optimizer, lr_scheduler, config)
            bar.close()
            accelerator.end_training()
            median = statistics.median(step_times[1:] or step_times)
            return TrainResult(
                output,
                runs.checkpoint_dir(output, done),
                done,
                loss_value,
                median,
                n_trainable,
                validation_images,
                stopped=True,
            )
    bar.close()

    # ---- replicas must agree (DDP): every rank's adapter checksum, recorded
    if world > 1:
        sums = accelerator.gather(
            torch.tensor(
                [adapter_checksum({c: accelerator.unwrap_model(m) for c, m in modules.items()}, config.method)],
                dtype=torch.float64,
                device=device,
            )
        )
        if accelerator.is_main_process:
            (output / runs.RANKS_NAME).write_text(
                json.dumps(
                    {
                        "num_processes": world,
                        "adapter_checksums": sums.tolist(),
                        "in_sync": bool(torch.all(sums == sums[0])),
                    },
                    indent=2,
                )
            )

    # ---- the end: final validation, the adapter, config and model card
    images = run_validation(accelerator, pipe, modules, text_encoders, config, output, config.max_steps)
    validation_images += images
    if progress is not None and accelerator.is_main_process:
        progress(StepReport(config.max_steps, loss_value, None, tuple(images)))
    full = config.method == FULL  # no adapter: the tuned components as diffusers folders
    adapter_file = None if full else runs.adapter_file(output)
    tuned_components = [runs.tuned_component_dir(output, c) for c in modules] if full else []
    if accelerator.is_main_process:
        unwrapped = {c: accelerator.unwrap_model(m) for c, m in modules.items()}
        if full:
            save_tuned_components(unwrapped, model_dir, output)
        else:
            run_metadata = runs.run_metadata(config, resolution)
            adapter_file = save_adapter(unwrapped, adapter_file, overwrite=True, metadata=run_metadata)
            # the file for ComfyUI and Forge: its dora_scale depends on the base weights (formats/comfyui.py)
            save_comfyui(unwrapped, runs.comfyui_file(output), overwrite=True, metadata=run_metadata)
        write_model_card(
            output, config, resolution=resolution, trainable_parameters=n_trainable, images=validation_images
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    median = statistics.median(step_times[1:] or step_times) if step_times else float("nan")
    return TrainResult(
        output,
        adapter_file,
        config.max_steps,
        loss_value,
        median,
        n_trainable,
        validation_images,
        tuned_components=tuned_components,
    )


def generate_class_images(
    pipe, class_dir: Path, class_prompt: str, wanted: int, resolution: int, config: TrainConfig
) -> None:
    """Fill ``class_dir`` up to ``wanted`` images of ``class_prompt`` from the base model (kept for later runs)."""
    from .data import IMAGE_EXTENSIONS
    from .sampling import SampleSettings, generate

    class_dir.mkdir(parents=True, exist_ok=True)
    have = [p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    if len(have) >= wanted:
        return
    print(f"generating {wanted - len(have)} class images of {class_prompt!r} in {class_dir}")
    for i in range(len(have), wanted):
        settings = SampleSettings(
            class_prompt,
            seed=config.seed + 100_000 + i,
            steps=config.validation_inference_steps,
            guidance=config.validation_guidance,
            width=resolution,
            height=resolution,
        )
        image = generate(pipe, settings)[0]
        tmp = class_dir / f".class_{i:05d}.png"
        image.save(tmp)
        os.replace(tmp, class_dir / f"class_{i:05d}.png")


def run_validation(
    accelerator, pipe, modules, text_encoders, config: TrainConfig, output: Path, step: int
) -> list[Path]:
    """Fixed-seed validation images (seed, seed+1, ...) saved under ``validation/`` and logged."""
    if not accelerator.is_main_process or config.num_validation_images < 1:
        return []
    from diffusers import StableDiffusionXLPipeline

    from .sampling import SampleSettings, generate

    unet = accelerator.unwrap_model(modules["unet"])
    tes = [accelerator.unwrap_model(t) for t in text_encoders]
    val_pipe = StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=tes[0],
        text_encoder_2=tes[1],
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=unet,
        scheduler=pipe.scheduler,
    )
    val_pipe.set_progress_bar_config(disable=True)
    for m in modules.values():
        m.eval()
    settings = SampleSettings(
        config.validation_prompt or config.prompt,
        seed=config.seed,
        steps=config.validation_inference_steps,
        guidance=config.validation_guidance,
    )
    with accelerator.autocast():
        images = generate(val_pipe, settings, num_images=config.num_validation_images)
    paths = []
    for i, image in enumerate(images):
        path = runs.validation_image_path(output, step, config.seed + i)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)  # readers (the app) never see a half-written image
        paths.append(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
    return paths
