"""The DreamBooth loop: LoRA, DoRA or magnitude-only adapters on SDXL, or full fine-tuning of the layers they
would adapt (``full``), with accelerate underneath.

``train(config)`` reads top to bottom: set up, load, adapt, cache, then one optimizer step per loop
iteration, with validation images and checkpoints on the way, and the adapter, the resolved config
and a model card at the end. SDXL specifics (prompt encoding, data order, seeded noise) are the small
pure helpers of ``batches``; the loss (target, min-SNR weights) is ``losses``; the output folder, the run lock
and checkpoints are ``checkpoints``; class and validation images are ``validation``.

Reproducibility: every random draw comes from a generator keyed on (seed, step, rank) or
(seed, image), never from hidden global state, except dropout, whose global RNG state is saved in
checkpoints. So N steps + resume + N steps gives exactly the adapter of 2N steps straight.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import runs
from .batches import Batches, batch_indices, encode_prompts, seeded_generator  # noqa: F401 (re-exported)
from .checkpoints import (
    find_checkpoint,
    load_checkpoint,
    output_lock,
    prepare_output,
    record_replicas,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .data import SubjectDataset, scan_subject_folder
from .full import (
    FULL,
    save_tuned_components,
    tune_layers,
    tuned_summary,
)
from .inject import adapter_summary, add_adapters
from .losses import diffusion_loss, loss_weights, training_target
from .optim import build_optimizer
from .validation import generate_class_images, run_validation

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
    adapter = config.adapter  # its method, rank and targets; full: the targeted layers to train
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    unet, vae = pipe.unet, pipe.vae
    text_encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
    modules: dict[str, torch.nn.Module] = {"unet": unet}
    if config.train_text_encoder:
        modules.update(zip(("text_encoder", "text_encoder_2"), text_encoders, strict=True))
    for m in (unet, *text_encoders):
        if adapter.method == FULL and any(m is t for t in modules.values()):
            tune_layers(m, adapter.targets, device=device, dtype=weight_dtype)  # its targeted layers train, in fp32
        else:
            m.to(device) if weight_dtype == torch.float32 else m.to(device, dtype=weight_dtype)
    vae.to(device)  # loaded in fp32 and kept there: SDXL's VAE overflows in fp16
    if adapter.method != FULL:
        adapter_cfg = config.adapter_config()
        for m in modules.values():
            add_adapters(m, adapter_cfg)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    summary_of = tuned_summary if adapter.method == FULL else adapter_summary
    n_trainable = sum(summary_of(m)["trainable_parameters"] for m in modules.values())
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # ---- caches: text embeddings when the encoders are frozen, VAE latents when asked
    datasets = {"instance": dataset, "class": class_dataset}
    inputs = Batches(config, datasets, vae, text_encoders, tokenizers, device)

    # ---- optimizer and schedule (stepped once per optimizer step; not handed to accelerate)
    optimizer, lr_scheduler = build_optimizer(config, unet, text_encoders)
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
                    k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_flat().items()
                },
            )
        runs.write_run_config(
            output,
            {**config.to_flat(), "resolution": resolution, "trainable_parameters": n_trainable, "num_processes": world},
        )
        print(
            f"training {adapter.method} ({'' if adapter.method == FULL else f'rank {adapter.rank}, '}"
            f"targets {adapter.targets!r}) on {len(dataset)} images: "
            f"{n_trainable:,} trainable parameters, {config.max_steps} steps"
        )
        for comp, m in modules.items():
            if adapter.method == FULL:
                counts = tuned_summary(accelerator.unwrap_model(m))
                print(f"  {comp}: full on {counts['layers']} layers, {counts['trainable_parameters']:,} parameters")
                continue
            for method, counts in adapter_summary(accelerator.unwrap_model(m))["per_method"].items():
                print(f"  {comp}: {method} on {counts['layers']} layers, {counts['trainable_parameters']:,} parameters")

    # ---- the loop: one iteration = one optimizer step
    step_times: list[float] = []
    validation_images: list[Path] = []
    loss_value = float("nan")
    bar = tqdm(total=config.max_steps, initial=start_step, disable=not accelerator.is_main_process, desc=adapter.method)
    for step in range(start_step, config.max_steps):
        started = time.perf_counter()
        for m in modules.values():
            m.train()
        loss_sum = 0.0
        for micro in range(config.gradient_accumulation):
            micro_step = step * config.gradient_accumulation + micro
            gen = seeded_generator(config.seed, 3, micro_step, rank)
            # batch: instance examples, then as many class examples (prior preservation)
            latents, prompts, time_ids = inputs.make_batch(
                "instance",
                batch_indices(config.seed, micro_step, rank, world, config.batch_size, len(dataset)),
                gen,
            )
            if class_dataset is not None:
                c_lat, c_prompts, c_ids = inputs.make_batch(
                    "class",
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
            embeds, pooled = inputs.conditioning(prompts, text_encoders)
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
        record_replicas(accelerator, output, modules, adapter.method)

    # ---- the end: final validation, the adapter, config and model card
    images = run_validation(accelerator, pipe, modules, text_encoders, config, output, config.max_steps)
    validation_images += images
    if progress is not None and accelerator.is_main_process:
        progress(StepReport(config.max_steps, loss_value, None, tuple(images)))
    full = adapter.method == FULL  # no adapter: the tuned components as diffusers folders
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
