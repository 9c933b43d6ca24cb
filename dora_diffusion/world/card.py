"""The embedded model's card: the world, the recipe, steps, wall time, loss curves, samples, judged figures.

Everything in it is measured when it is written (``write_model_card``): the judge's accuracy on held-out
renders, prompt following of the model and of the same architecture with random weights, and the
SHA-256 of every shipped file (a test checks the files against this list).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .render import render
from .toys import CLASSES, COLOURS, SCENES, Toy, sample_toy

CARD = "README.md"
HASHES_HEADER = "## Files (SHA-256)"


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the card and its pictures."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != CARD and not rel.startswith("card/"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hashes_in_card(card: Path) -> dict[str, str]:
    """The hash list a card states (``sha256  path`` lines in the block under ``HASHES_HEADER``)."""
    text = card.read_text(encoding="utf-8").split(HASHES_HEADER, 1)[1]
    block = text.split("```", 2)[1]
    return {path: digest for digest, path in (line.split() for line in block.strip().splitlines()[1:])}


def loop_seconds(rows: list[dict[str, Any]]) -> float:
    """Training-loop time of a stage from its log: each chunk's rows count seconds from the chunk's start,
    so a chunk ends where the clock goes back; the sum of the chunks' last readings."""
    total, last = 0.0, 0.0
    for row in rows:
        if row["seconds"] < last:
            total += last
        last = row["seconds"]
    return total + last


def _plot_losses(work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), constrained_layout=True)
    for ax, stage in zip(axes, ("vae", "judge", "unet"), strict=True):
        path = work / stage / "log.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean of 50 steps)")
        ax.set_yscale("log")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _random_floor_pipe(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    from ..models import toy_sdxl_components

    pipe = StableDiffusionXLPipeline(**toy_sdxl_components(seed), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_model_card(work: str | Path, model_dir: str | Path, n: int = 64) -> Path:
    """Measure the finished model and write ``model_dir/README.md`` with its pictures under ``card/``
    (prompt following over ``n`` generations)."""
    from diffusers import StableDiffusionXLPipeline

    from .evaluate import contact_sheet, generate_batch, prompt_following, prompt_for
    from .judge import Judge

    work, model_dir = Path(work), Path(model_dir)
    pics = model_dir / "card"
    pics.mkdir(parents=True, exist_ok=True)
    recipe = json.loads((work / "recipe.json").read_text())
    stages = {s: json.loads((work / s / "done.json").read_text()) for s in ("data", "vae", "judge", "unet")}
    logs = {
        s: [json.loads(line) for line in (work / s / "log.jsonl").read_text().splitlines()]
        for s in ("vae", "judge", "unet")
    }
    # training-loop time from the logs (an interrupted chunk counts up to its last log row); what runs
    # after a loop (the latents, the held-out evaluation) takes seconds and is not counted
    wall: dict[str, float] = {"data": stages["data"]["seconds"]}
    for s, rows in logs.items():
        wall[s] = loop_seconds(rows)
    unet_log = logs["unet"]

    _plot_losses(work, pics / "loss_curves.png")
    rng = np.random.default_rng(7)
    world = [render(sample_toy(rng)) for _ in range(32)]
    contact_sheet(world, 8, 2).save(pics / "world.png")

    judge = Judge.load(model_dir / "judge")
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    learned, learned_images = prompt_following(pipe, judge, n=n)
    contact_sheet(learned_images[:32], 8, 2).save(pics / "prompt_following.png")
    floor, _ = prompt_following(_random_floor_pipe(), judge, n=n)
    # One row per class: eight colours, scenes in turn.
    prompts, seeds = [], []
    for kind in CLASSES:
        for j, colour in enumerate(COLOURS):
            toy = Toy(kind, colour, list(SCENES)[j % len(SCENES)])
            prompts.append(prompt_for(toy))
            seeds.append(len(seeds))
    contact_sheet(generate_batch(pipe, prompts, seeds), 8, 2).save(pics / "samples.png")

    acc = stages["judge"]["accuracy"]
    # the thread counts of the chunks that did the work (a resumed chunk that only re-exported counts for nothing)
    chunks = [json.loads(line) for line in (work / "wall.jsonl").read_text().splitlines()]
    threads = "/".join(str(t) for t in sorted({c["threads"] for c in chunks if c["seconds"] > 10})) or "?"
    hashes = file_hashes(model_dir)
    total = sum(wall.values())
    lines = [
        "# toy-sdxl: the embedded tiny SDXL, pretrained on a procedural toy world",
        "",
        "SDXL's architecture (`StableDiffusionXLPipeline`: both CLIP text encoders and their tokenizers, a",
        "`UNet2DConditionModel` with SDXL's block layout, cross-attention at the lower levels and `text_time`",
        "conditioning, an `AutoencoderKL`, SDXL's Euler scheduler), small enough to pretrain on a 2-core CPU.",
        "64 px images, a 4x VAE, 16x16x4 latents. Made by `dora-diffusion pretrain-tiny` (`dora_diffusion/world/`).",
        "",
        "## The world",
        "",
        f"Seven kinds of toy ({', '.join(CLASSES)}; robots {CLASSES['robot']:.0%} of pictures), eight body",
        f"colours ({', '.join(COLOURS)}), robots with an eye colour, a chest symbol (heart, star, square, circle",
        f"or none) and an antenna ball colour; seven scenes ({', '.join(SCENES)}); pose, scale, position and",
        'light vary. Captions name what is drawn: "a photo of a red toy car on the grass", and shorter forms',
        'down to "a photo of a toy". The sample subject `datasets/sks_toy` (a teal robot with a red heart)',
        "is never drawn: there are teal robots and robots with hearts, but never both.",
        "",
        "![world](card/world.png)",
        "",
        "## Recipe",
        "",
        "| stage | what | steps | wall time |",
        "|---|---|---:|---:|",
        f"| data | {stages['data']['images']:,} renders | | {wall.get('data', 0):.0f} s |",
        f"| vae | AutoencoderKL on {recipe['vae_crop']} px crops, MSE + 0.5 L1 + {recipe['kl_weight']:g} KL,"
        " bf16 autocast;"
        f" reconstruction MSE {stages['vae']['recon_mse']:.4f} ([-1, 1] scale); scaling factor"
        f" {stages['vae']['scaling_factor']:.4f} | {recipe['vae_steps']:,} x {recipe['vae_batch']} |"
        f" {wall.get('vae', 0) / 60:.1f} min |",
        "| judge | CNN on renders and their VAE reconstructions |"
        f" {recipe['judge_steps']:,} x {recipe['judge_batch']} |"
        f" {wall.get('judge', 0) / 60:.1f} min |",
        f"| unet | UNet + both text encoders jointly, epsilon, min-SNR-{recipe['snr_gamma']:g}, caption dropout"
        f" {recipe['caption_dropout']:.0%} (zero embeddings), AdamW {recipe['unet_lr']:g} / {recipe['text_lr']:g}"
        f" (text), EMA {recipe['ema_decay']}; final loss {unet_log[-1]['loss']:.4f} |"
        f" {recipe['unet_steps']:,} x {recipe['unet_batch']} | {wall.get('unet', 0) / 60:.1f} min |",
        "",
        f"Total {total / 60:.0f} min on a 2-core x86 CPU (seed {recipe['seed']}, torch threads {threads}), in resumable"
        " chunks; the loop times are read from the stages' logs.",
        "Reproduce: `dora-diffusion pretrain-tiny --work outputs/pretrain`"
        " (add `--max-minutes 60` to run it in chunks).",
        "",
        "![loss curves](card/loss_curves.png)",
        "",
        "## What it draws",
        "",
        "One row per class, the eight colours in turn, scenes cycling (seed = cell index, 25 Euler steps, guidance 5):",
        "",
        "![samples](card/samples.png)",
        "",
        "## Judged",
        "",
        f"The judge (`judge/`, a {sum(p.numel() for p in judge.parameters()):,}-parameter CNN) on"
        f" {stages['judge']['held_out_renders']:,} held-out renders: "
        + ", ".join(f"{k} {v:.1%}" for k, v in acc.items())
        + ". On "
        f"{stages['judge'].get('held_out_robots', 0):,} held-out robots of every colour and symbol, it sees the sample"
        f" subject's combination (teal, heart) in {stages['judge'].get('subject_recall', float('nan')):.0%} of the"
        f" {stages['judge'].get('subject_robots', 0)} that have it and in"
        f" {stages['judge'].get('subject_false_positive', float('nan')):.1%} of the others."
        " (Trained on the world alone,"
        " it had learned that teal robots never wear a heart: the 4,000 extra robot renders it is trained on"
        " include that combination; the generator never saw it.)",
        "",
        f'Prompt following: {n} prompts drawn like the captions ("a photo of a {{colour}} toy {{class}} {{scene}}"),',
        f"one image each (seeds 1234-{1233 + n}, 25 Euler steps, guidance 5), read by the judge:",
        "",
        "| model | class right | colour right | scene right |",
        "|---|---:|---:|---:|",
        f"| this model | {learned['kind']:.0%} | {learned['colour']:.0%} | {learned['scene']:.0%} |",
        f"| same architecture, random weights (floor) | {floor['kind']:.0%} | {floor['colour']:.0%}"
        f" | {floor['scene']:.0%} |",
        f"| chance | {1 / len(CLASSES):.0%} | {1 / len(COLOURS):.0%} | {1 / len(SCENES):.0%} |",
        "",
        "![prompt following](card/prompt_following.png)",
        "",
        HASHES_HEADER,
        "",
        "```",
        "sha256  path",
        *[f"{digest}  {path}" for path, digest in hashes.items()],
        "```",
        "",
    ]
    card = model_dir / CARD
    card.write_text("\n".join(lines), encoding="utf-8")
    (work / "card_metrics.json").write_text(
        json.dumps({"learned": learned, "floor": floor, "judge": acc, "wall_seconds": wall}, indent=2)
    )
    return card


def card_metrics(work: Path) -> dict[str, Any]:
    return json.loads((Path(work) / "card_metrics.json").read_text())
