"""A run's writing side of its folder: refusing a non-empty output, the run lock that keeps a second run
out, and checkpoints (written atomically, checked against the options on resume, RNG states included).
The names and layout are ``runs``'; the loop (``train``) calls these."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import runs
from .config import ConfigError, TrainConfig
from .full import FULL, load_tuned_state_dict, tuned_state_dict
from .inject import adapter_state_dict, load_adapter_state_dict


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
        trained = {
            c: trainable_state_dict(accelerator.unwrap_model(m), config.adapter.method) for c, m in modules.items()
        }
        runs.write_checkpoint_tensors(tmp / checkpoint_weights_name(config.adapter.method), trained)
        torch.save(optimizer.state_dict(), tmp / runs.OPTIMIZER_NAME)
        torch.save(lr_scheduler.state_dict(), tmp / runs.SCHEDULER_NAME)
        runs.write_checkpoint_state(tmp, step, config.to_flat())  # last: a folder with it is complete
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
    saved, given = state["config"], config.to_flat()
    for key in ("method", "rank", "alpha", "targets", "train_text_encoder", "model"):
        if saved.get(key) != given[key]:
            raise ConfigError(
                f"resume: {key} is {given[key]!r} but checkpoint {path} was trained with {saved.get(key)!r}"
            )
    adapter = path / checkpoint_weights_name(config.adapter.method)
    by_component = runs.read_checkpoint_tensors(adapter)
    load = load_tuned_state_dict if config.adapter.method == FULL else load_adapter_state_dict
    for comp, module in modules.items():
        load(accelerator.unwrap_model(module), by_component.get(comp, {}), source=f"{adapter} ({comp})")
    # Our own files, loaded without unpickling code (weights_only).
    optimizer.load_state_dict(torch.load(path / runs.OPTIMIZER_NAME, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / runs.SCHEDULER_NAME, weights_only=True))
    rng = runs.rng_file(path, accelerator.process_index)
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))  # numpy/python states are tuples, our file
    return int(state["step"])


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


def record_replicas(accelerator, output: Path, modules: dict, method: str) -> None:
    """Several processes (DDP): gather every rank's ``adapter_checksum`` and write them to ``ranks.json``,
    with whether they agree (replicas must)."""
    sums = accelerator.gather(
        torch.tensor(
            [adapter_checksum({c: accelerator.unwrap_model(m) for c, m in modules.items()}, method)],
            dtype=torch.float64,
            device=accelerator.device,
        )
    )
    if accelerator.is_main_process:
        (output / runs.RANKS_NAME).write_text(
            json.dumps(
                {
                    "num_processes": accelerator.num_processes,
                    "adapter_checksums": sums.tolist(),
                    "in_sync": bool(torch.all(sums == sums[0])),
                },
                indent=2,
            )
        )
