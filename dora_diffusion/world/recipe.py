"""The pretraining recipe of the embedded tiny SDXL (``PretrainConfig``, its stages' names) and the world's
pictures as the models take them: seeded generators, renders, pixels to model input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .render import render
from .toys import Toy, sample_toy

STAGES = ("data", "vae", "judge", "unet", "export")


@dataclass
class PretrainConfig:
    """The recipe. The shipped weights were made with these defaults (see the model card)."""

    work: str
    """Working folder: the rendered world, latents, checkpoints, logs (not shipped)."""
    output: str | None = None
    """Where the finished pipeline and judge go (default ``work/model``)."""
    seed: int = 0
    images: int = 20000
    """Rendered training pictures (the judge's held-out set is rendered apart, with seed + 1)."""
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    judge_steps: int = 3000
    judge_robots: int = 4000
    """Extra robot renders for the judge only, every colour x symbol, the subject's combination included
    (trained on the world alone, the judge learns that teal robots never wear a heart)."""
    judge_batch: int = 64
    judge_lr: float = 2e-3
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 3e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    checkpoint_every: int = 250
    threads: int = 2
    max_minutes: float | None = None
    """End this chunk at the first checkpoint after this many minutes (resume by running again)."""
    stop_after: str | None = None
    """Stop when this stage is done (e.g. ``vae``), for tests and for chunking by hand."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise ValueError(f"stop_after: {self.stop_after!r} is not one of {', '.join(STAGES)}")
        for name in ("images", "vae_batch", "judge_batch", "unet_batch", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``keys``."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator("cpu").manual_seed(seed)


def render_world(n: int, seed: int, **kwargs: Any) -> tuple[np.ndarray, list[Toy]]:
    """``n`` toys drawn from ``seed`` (``sample_toy``'s options): uint8 pixels [n, 64, 64, 3], attributes."""
    rng = np.random.default_rng(seed)
    toys = [sample_toy(rng, **kwargs) for _ in range(n)]
    return np.stack([np.asarray(render(t)) for t in toys]), toys


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
