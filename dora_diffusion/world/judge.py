"""The toy world's judge: a small CNN that reads class, colours, parts and scene from a 64 px image.

Trained on the world's renders (and their VAE reconstructions, so that the VAE's blur is familiar),
never on a generation. Its penultimate features (``embed``) serve as the image embedding of the
embedded model's metrics, as DINO's do on a real one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .toys import CLASSES, COLOURS, EYE_COLOURS, SCENES, SYMBOLS, Toy, is_subject

# What the judge reads, and the values each field takes (in head order).
FIELDS: dict[str, tuple[str, ...]] = {
    "kind": tuple(CLASSES),
    "colour": tuple(COLOURS),
    "scene": tuple(SCENES),
    "symbol": SYMBOLS,
    "eye": EYE_COLOURS,
}
ROBOT_ONLY = ("symbol", "eye")  # fields that only robots have: trained and scored on robots only
WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge.json"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class Judge(nn.Module):
    """``forward(x)`` -> logits per field; ``embed(x)`` -> the [B, 2 * width] features before the heads.
    ``x``: [B, 3, 64, 64] in [-1, 1]."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(self.widths):
            layers.append(_block(c, w))
            if i < len(self.widths) - 1:
                layers.append(nn.AvgPool2d(2))
            c = w
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * c, len(values)) for name, values in FIELDS.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # mean and max over positions: the max keeps small parts (a chest symbol) that the mean washes out
        h = self.body(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 2 * width]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        return {name: head(h) for name, head in self.heads.items()}

    # ---- reading PIL images

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image], batch: int = 64) -> list[dict[str, Any]]:
        """What the judge sees in each image: the most likely value per field, and ``subject``
        (a teal robot with a heart, the sample subject)."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), batch):
            logits = self(to_judge_input(images[i : i + batch]))
            picks = {name: logits[name].argmax(-1).tolist() for name in FIELDS}
            for j in range(len(picks["kind"])):
                reading = {name: FIELDS[name][picks[name][j]] for name in FIELDS}
                reading["subject"] = is_subject(reading["kind"], reading["colour"], reading["symbol"])
                out.append(reading)
        return out

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch: int = 64) -> torch.Tensor:
        """[N, 2 * width] features of PIL images."""
        return torch.cat([self.embed(to_judge_input(images[i : i + batch])) for i in range(0, len(images), batch)])

    # ---- files

    def save(self, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        config = {
            "widths": list(self.widths),
            "fields": {k: list(v) for k, v in FIELDS.items()},
            "metrics": metrics or {},
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Judge:
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        if config.get("fields") != {k: list(v) for k, v in FIELDS.items()}:
            raise ValueError(f"{folder / CONFIG_NAME}: the judge reads other fields than this world has")
        judge = cls(config["widths"])
        judge.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return judge.eval()


def to_judge_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> [B, 3, 64, 64] in [-1, 1] (resized to 64 px where they are not)."""
    arrays = [
        np.asarray(
            im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC) if im.size != (64, 64) else im.convert("RGB"),
            np.float32,
        )
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def targets(toys: Sequence[Toy]) -> dict[str, torch.Tensor]:
    """Label indices per field; -100 (ignored by cross-entropy) for robot-only fields of other toys."""
    out = {}
    for name, values in FIELDS.items():
        labels = [
            values.index(getattr(t, "kind" if name == "kind" else name))
            if name not in ROBOT_ONLY or t.kind == "robot"
            else -100
            for t in toys
        ]
        out[name] = torch.tensor(labels)
    return out


def judge_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[k], labels[k], ignore_index=-100) for k in FIELDS)


@torch.no_grad()
def accuracy(judge: Judge, images: torch.Tensor, toys: Sequence[Toy], batch: int = 256) -> dict[str, float]:
    """Per-field accuracy on ``images`` ([N, 3, 64, 64] in [-1, 1]) labelled by ``toys``."""
    labels = targets(toys)
    right = {k: 0 for k in FIELDS}
    counted = {k: 0 for k in FIELDS}
    for i in range(0, len(toys), batch):
        logits = judge(images[i : i + batch])
        for k in FIELDS:
            y = labels[k][i : i + batch]
            mask = y != -100
            right[k] += int((logits[k].argmax(-1)[mask] == y[mask]).sum())
            counted[k] += int(mask.sum())
    return {k: right[k] / max(1, counted[k]) for k in FIELDS}


@dataclass
class Readings:
    """How often the judge read what a set of prompts asked for."""

    asked: list[dict[str, str]]
    read: list[dict[str, Any]]

    def rate(self, field: str) -> float:
        pairs = [(a[field], r[field]) for a, r in zip(self.asked, self.read, strict=True) if field in a]
        return sum(a == r for a, r in pairs) / max(1, len(pairs))

    def subject_rate(self) -> float:
        return sum(r["subject"] for r in self.read) / max(1, len(self.read))
