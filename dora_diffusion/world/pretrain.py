"""Pretraining the embedded tiny SDXL on the toy world: ``dora-diffusion pretrain-tiny``.

Stages, in order, each resumable from its last checkpoint (``work/<stage>/state.pt``) and seeded so that
an interrupted and resumed run gives the same weights as a straight one:

1. ``data``:  render ``images`` toys (``world.npz``: pixels; ``world.json``: their attributes).
2. ``vae``:   the ``AutoencoderKL`` on random crops (the VAE is convolutional; crops are 4x cheaper),
              then its latent scaling factor (1 / std of the latents, as SD's 0.13025 was found) and
              the latents of every image (mean and std of the posterior, sampled per step later).
3. ``judge``: the world's judge on the renders and their VAE reconstructions; accuracy on fresh renders.
4. ``unet``:  the UNet and both text encoders jointly, epsilon prediction, min-SNR-5 weighting, the
              caption dropped for 10% of the examples (zero embeddings: what SDXL's pipeline feeds the
              unconditional branch, ``force_zeros_for_empty_prompt``), an EMA of the UNet.
5. ``export``: the pipeline folder (EMA UNet) and the judge into ``output``.

``max_minutes`` ends a chunk at the next checkpoint after that many minutes; run the same command again
to continue. Everything random comes from generators keyed on (seed, stage, step).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .recipe import STAGES, PretrainConfig, render_world, to_model_input  # noqa: F401 (re-exported)
from .resumable import Clock
from .stages import stage_data, stage_export, stage_judge, stage_unet, stage_vae


def pretrain_tiny(cfg: PretrainConfig) -> Path | None:
    """Run (or continue) the recipe. Returns the finished model folder, or None when the chunk ended
    first (``max_minutes``, ``stop_after``)."""
    from ..models import toy_sdxl_components

    torch.set_num_threads(cfg.threads)
    print(f"pretrain-tiny: {cfg.threads} torch thread(s), work folder {cfg.work}")
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.json"
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("work", "output", "max_minutes", "stop_after", "threads")}
    if recipe.is_file() and json.loads(recipe.read_text()) != mine:
        raise ValueError(f"{recipe}: this work folder was started with another recipe; use a new folder")
    recipe.write_text(json.dumps(mine, indent=2) + "\n")
    clock = Clock(cfg.max_minutes)
    components = toy_sdxl_components(cfg.seed)

    def chunk(started: float, name: str) -> None:
        with open(work / "wall.jsonl", "a", encoding="utf-8") as f:
            f.write(
                json.dumps({"stage": name, "seconds": time.perf_counter() - started, "threads": cfg.threads}) + "\n"
            )

    t = time.perf_counter()
    stage_data(cfg, work)
    chunk(t, "data")
    if cfg.stop_after == "data":
        return None
    t = time.perf_counter()
    ok = stage_vae(cfg, work, components, clock)
    chunk(t, "vae")
    if not ok or cfg.stop_after == "vae":
        return None
    t = time.perf_counter()
    ok, judge = stage_judge(cfg, work, clock, components["vae"])
    chunk(t, "judge")
    if not ok or cfg.stop_after == "judge":
        return None
    t = time.perf_counter()
    ok = stage_unet(cfg, work, components, clock)
    chunk(t, "unet")
    if not ok or cfg.stop_after == "unet":
        return None
    return stage_export(cfg, work, components, judge, Path(cfg.output) if cfg.output else work / "model")
