"""What the embedded model draws, as the judge reads it: prompt following and the subject's presence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .judge import Judge, Readings
from .render import render
from .toys import SCENES, SUBJECT, Toy, sample_toy

# The caption form prompt following is measured with: every field named.
PROMPT_FORM = "a photo of a {colour} {name} {where}"


def prompt_for(toy: Toy) -> str:
    name = "teddy bear" if toy.kind == "teddy" else f"toy {toy.kind}"
    return PROMPT_FORM.format(colour=toy.colour, name=name, where=SCENES[toy.scene])


def generate_batch(
    pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 5.0, batch: int = 16
) -> list[Image.Image]:
    """One image per (prompt, seed), generated in batches; the seed fixes each image's initial noise."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch]]
        out = pipe(list(prompts[i : i + batch]), num_inference_steps=steps, guidance_scale=guidance, generator=gens)
        images += out.images
    return images


def prompt_following(
    pipe, judge: Judge, n: int = 64, seed: int = 1234, **kwargs: Any
) -> tuple[dict[str, float], list[Image.Image]]:
    """Generate ``n`` images from prompts drawn like the captions (class, colour, scene named) and
    return how often the judge reads the prompted class, colour and scene, with the images."""
    rng = np.random.default_rng(seed)
    toys = [sample_toy(rng) for _ in range(n)]
    prompts = [prompt_for(t) for t in toys]
    images = generate_batch(pipe, prompts, [seed + i for i in range(n)], **kwargs)
    readings = Readings([{"kind": t.kind, "colour": t.colour, "scene": t.scene} for t in toys], judge.read(images))
    return {"n": n, **{f: readings.rate(f) for f in ("kind", "colour", "scene")}}, images


def subject_presence(
    pipe, judge: Judge, prompt: str, seeds: Sequence[int], scene: str | None = None, **kwargs: Any
) -> tuple[dict[str, Any], list[Image.Image]]:
    """How often ``prompt`` gives the subject (a teal robot with a heart), and ``scene`` if given."""
    images = generate_batch(pipe, [prompt] * len(seeds), seeds, **kwargs)
    read = judge.read(images)
    out: dict[str, Any] = {
        "prompt": prompt,
        "n": len(seeds),
        "subject": sum(r["subject"] for r in read) / len(read),
        "robot": sum(r["kind"] == "robot" for r in read) / len(read),
        "teal_robot": sum(r["kind"] == "robot" and r["colour"] == "teal" for r in read) / len(read),
    }
    if scene is not None:
        out["scene"] = sum(r["scene"] == scene for r in read) / len(read)
    return out, images


def subject_renders(n: int, seed: int = 3) -> list[Image.Image]:
    """The sample subject (teal robot, yellow eye, red heart, orange antenna ball) drawn by the world's own
    renderer, framed as the world frames robots (a little larger: 0.55-0.8 of the picture). The model never
    saw these; they show how much of the subject's look the sample photos' different style costs."""
    rng = np.random.default_rng(seed)
    parts = {k: getattr(SUBJECT, k) for k in ("colour", "symbol", "eye", "antenna")}
    out = []
    for _ in range(n):
        framing = sample_toy(rng, kind="robot", allow_subject=True)
        out.append(render(replace(framing, **parts, height=float(rng.uniform(0.55, 0.8)))))
    return out


def contact_sheet(images: Sequence[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """Images side by side in rows of ``columns``, enlarged ``scale`` times (nearest neighbour)."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)
