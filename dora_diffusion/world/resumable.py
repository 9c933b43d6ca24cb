"""What makes a pretraining stage resumable: its folder (checkpoint, log, done marker), the chunk's deadline,
and the training loop that picks up from the checkpointed step with the warm-up/cosine schedule, so that
an interrupted and resumed stage gives the same weights as a straight one."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .recipe import PretrainConfig


class Clock:
    """The chunk's deadline (``max_minutes``)."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def up(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


class Stage:
    """One stage's folder: its checkpoint, its log, its done marker."""

    def __init__(self, work: Path, name: str):
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    def finish(self, info: dict[str, Any]) -> None:
        (self.dir / "done.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def info(self) -> dict[str, Any]:
        return json.loads((self.dir / "done.json").read_text(encoding="utf-8"))

    def load(self) -> dict[str, Any] | None:
        path = self.dir / "state.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.dir / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.dir / "state.pt")

    def log(self, row: dict[str, Any]) -> None:
        with open(self.dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_log(self, step: int) -> None:
        kept = [row for row in self.rows() if row["step"] <= step]
        path = self.dir / "log.jsonl"
        tmp = self.dir / "log.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        tmp.replace(path)

    def rows(self) -> list[dict[str, Any]]:
        path = self.dir / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_loop(
    stage: Stage,
    cfg: PretrainConfig,
    clock: Clock,
    steps: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    peaks: list[float],
    step_fn,
    extra_state=None,
) -> bool:
    """Run ``step_fn(step) -> loss`` from the checkpointed step to ``steps``. False if the chunk's time ran out."""
    from tqdm.auto import tqdm

    state = stage.load()
    start = 0
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        if extra_state is not None:
            extra_state[1](state["extra"])
        start = state["step"]
    stage.truncate_log(start)  # rows an interrupted chunk wrote after its last checkpoint
    window: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage.name, mininterval=5)
    for step in bar:
        for group, peak in zip(optimizer.param_groups, peaks, strict=True):
            group["lr"] = cosine_lr(step, steps, cfg.warmup_steps, peak)
        loss = step_fn(step)
        window.append(loss)
        done = step + 1
        if done % 50 == 0 or done == steps:
            stage.log({"step": done, "loss": float(np.mean(window)), "seconds": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            window = []
        if done % cfg.checkpoint_every == 0 or done == steps:
            stage.save(
                {
                    "step": done,
                    "optimizer": optimizer.state_dict(),
                    "modules": {n: m.state_dict() for n, m in modules.items()},
                    "extra": extra_state[0]() if extra_state is not None else {},
                }
            )
            if clock.up() and done < steps:
                bar.close()
                print(f"{stage.name}: stopped at step {done} of {steps} (max_minutes); run again to continue")
                return False
    bar.close()
    return True
