"""Images a run makes with the base model or itself: the prior-preservation class images (generated once, kept
for later runs) and the fixed-seed validation images written under ``validation/`` and logged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import runs
from .config import TrainConfig


def generate_class_images(
    pipe, class_dir: Path, class_prompt: str, wanted: int, resolution: int, config: TrainConfig
) -> None:
    """Fill ``class_dir`` up to ``wanted`` images of ``class_prompt`` from the base model (kept for later runs)."""
    from .images import IMAGE_EXTENSIONS
    from .sampling import SampleSettings, generate

    class_dir.mkdir(parents=True, exist_ok=True)
    have = [p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    if len(have) >= wanted:
        return
    print(f"generating {wanted - len(have)} class images of {class_prompt!r} in {class_dir}")
    # In batches (one image at a time, the tiny model's steps are mostly per-op overhead: 50 images took
    # 87 s, in batches of 10 27 s). Image i keeps seed seed + 100000 + i whatever the batch size
    # (``generate`` gives image j of a batch seed + j).
    batch = config.sample_batch_size
    for start in range(len(have), wanted, batch):
        n = min(batch, wanted - start)
        settings = SampleSettings(
            class_prompt,
            seed=config.seed + 100_000 + start,
            steps=config.validation_inference_steps,
            guidance=config.validation_guidance,
            width=resolution,
            height=resolution,
        )
        for i, image in enumerate(generate(pipe, settings, num_images=n), start=start):
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
