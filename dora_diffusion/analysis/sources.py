"""What the analysis reads: the paths it is given (training runs, checkpoints, adapter files, fine-tuned UNet
folders, through ``runs``), the base model each is compared against (loaded through ``models``), and the rows
of every adapted matrix at every snapshot."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runs
from ..formats.base import COMPONENTS, AdapterFileError, module_name
from ..formats.diffusers import plan_adapters
from ..formats.load import read_adapter_file, resolve_adapter_file
from ..inject import ADAPTER_PARAMS, AdapterConfig, make_adapter, name_matches
from ..layers import AdapterLinear
from .decomposition import adapter_decomposition, delta_d, delta_m
from .results import AnalysisError, DecompositionRow, step_key

FULL = "full"  # the method name of a fully fine-tuned UNet


# --------------------------------------------------------------------------------------------
# Base models: components loaded on first use, once per model
# --------------------------------------------------------------------------------------------


class BaseModel:
    """The base weights of one model (a diffusers pipeline folder or cached hub id, or a bare UNet
    folder); ``None`` is the embedded tiny model. Components are loaded (CPU) on first use."""

    def __init__(self, model: str | os.PathLike | None) -> None:
        self.model = None if model is None else os.fspath(model)
        self._folder: Path | None = None
        self._components: dict[str, nn.Module] = {}

    @property
    def folder(self) -> Path:
        if self._folder is None:
            from ..models import model_folder, resolve_model  # diffusers: imported when a model is loaded

            local = Path(self.model).expanduser() if self.model is not None else None
            if local is not None and _is_unet_folder(local):
                self._folder = local.absolute()
            else:
                self._folder = model_folder(resolve_model(self.model)).absolute()
        return self._folder

    def component(self, name: str) -> nn.Module:
        """One SDXL component with adapters, from the base model's folder (safetensors only, offline), frozen."""
        from ..models import load_component

        if name not in COMPONENTS:
            raise AnalysisError(f"{name}: not an SDXL component with adapters ({', '.join(COMPONENTS)})")
        if name not in self._components:
            if name != "unet" and _is_unet_folder(self.folder):
                raise AnalysisError(f"{self.folder}: is a UNet folder; it has no {name}")
            try:
                self._components[name] = load_component(self.folder, name)
            except (OSError, ValueError) as e:
                raise AnalysisError(f"{self.folder}: cannot load its {name} ({type(e).__name__}: {e})") from None
        return self._components[name]


def _is_unet_folder(path: Path) -> bool:
    from ..models import is_unet_folder

    return is_unet_folder(path)


# --------------------------------------------------------------------------------------------
# Runs: what a path holds, and its snapshots (checkpoints)
# --------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    step: int | None
    path: Path
    kind: str  # "checkpoint" (a training checkpoint's folder), "adapter" (an adapter file), "unet" (a UNet folder)


@dataclass
class RunSource:
    """What one path given to ``analyze_runs`` holds."""

    path: Path
    label: str
    model: str | None  # the base model recorded with it
    snapshots: list[Snapshot]
    method: str  # "full" for UNet folders; adapter files carry theirs per component ("" here)
    adapter_config: AdapterConfig | None = None  # how a training run built its adapters


def _unet_snapshots(path: Path) -> list[Snapshot]:
    """A full fine-tuning output: a UNet folder, a pipeline folder, or checkpoint-N/unet folders."""
    step_in = runs.step_in_path
    if _is_unet_folder(path):
        return [Snapshot(step_in(path), path, "unet")]
    found = [
        Snapshot(step_in(p), p, "unet") for p in path.glob(f"{runs.CHECKPOINT_PREFIX}*/unet") if _is_unet_folder(p)
    ]
    found += [Snapshot(step_in(p), p / "unet", "unet") for p in runs.checkpoints(path) if _is_unet_folder(p / "unet")]
    if _is_unet_folder(path / "unet"):
        found.append(Snapshot(step_in(path), path / "unet", "unet"))
    return sorted(found, key=lambda s: step_key(s.step))


def _run_adapter_config(cfg: dict[str, Any], where: Path) -> AdapterConfig:
    """The adapters a run was trained with, as the trainer builds them (``TrainConfig.adapter_config``)."""
    from ..config import OPTION_NAMES, TrainConfig

    try:
        return TrainConfig(**{k: v for k, v in cfg.items() if k in OPTION_NAMES}).adapter_config()
    except (TypeError, ValueError) as e:
        raise AnalysisError(f"{where}: its training config does not describe an adapter ({e})") from None


def describe_run(path: str | os.PathLike) -> RunSource:
    """Read what ``path`` is: a training run folder (``training_config.json``, checkpoints and the
    final adapter), one of its ``checkpoint-N`` folders, a full fine-tuning output (UNet folders), or
    one adapter file (or its folder)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such run folder or adapter file")
    if runs.is_checkpoint(path) and (path / runs.CHECKPOINT_ADAPTER_NAME).is_file():  # one training checkpoint
        state = runs.read_checkpoint_state(path)
        acfg = _run_adapter_config(state.get("config", {}), path / runs.STATE_NAME)
        return RunSource(
            path,
            f"{runs.run_of_checkpoint(path).name}@{path.name}",
            runs.base_model(path),
            [Snapshot(int(state["step"]), path, "checkpoint")],
            acfg.method,
            acfg,
        )
    cfg = runs.read_run_config(path)
    if cfg is not None:
        acfg = _run_adapter_config(cfg, runs.config_file(path))
        snaps = [
            Snapshot(runs.step_in_path(p), p, "checkpoint")
            for p in runs.checkpoints(path)
            if (p / runs.CHECKPOINT_ADAPTER_NAME).is_file()
        ]
        final = runs.adapter_file(path)
        if final.is_file():
            step = runs.adapter_metadata(final).get("trained_steps", cfg.get("max_steps"))
            if step not in {s.step for s in snaps}:  # a checkpoint of the same step holds the same weights
                snaps.append(Snapshot(step, final, "adapter"))
        if not snaps:
            raise AnalysisError(f"{path}: a training run without adapter checkpoints or {runs.ADAPTER_NAME}")
        return RunSource(
            path, path.name, runs.base_model(path), sorted(snaps, key=lambda s: step_key(s.step)), acfg.method, acfg
        )
    unets = _unet_snapshots(path) if path.is_dir() else []
    if unets:
        label = path.parent.name if path.name == "unet" else path.name
        return RunSource(path, label, None, unets, FULL)
    try:
        file = resolve_adapter_file(path)
    except AdapterFileError as e:
        raise AnalysisError(
            f"{path}: not a training run (no {runs.CONFIG_NAME}), a UNet folder or an adapter file ({e})"
        ) from None
    step = runs.adapter_metadata(file).get("trained_steps")
    label = path.stem if path.is_file() and path.name != runs.ADAPTER_NAME else file.parent.name
    return RunSource(
        path,
        label,
        runs.base_model(path),
        [Snapshot(step if isinstance(step, int) else runs.step_in_path(path), file, "adapter")],
        "",
    )


def _linear(module: nn.Module, name: str, where: str) -> nn.Linear:
    try:
        target = module.get_submodule(name)
    except AttributeError:
        raise AnalysisError(f"{where}: no module {name!r} in the base model (is it for another model?)") from None
    if not isinstance(target, nn.Linear):
        raise AnalysisError(f"{where}: {name} is a {type(target).__name__}, not a Linear")
    return target


@torch.no_grad()
def _checkpoint_adapters(checkpoint: Path, run: RunSource, base: BaseModel) -> dict[tuple[str, str], AdapterLinear]:
    """A training checkpoint's adapter state dicts (``runs.read_checkpoint_tensors``) as the adapters the
    trainer built, around the base model's Linear layers (not installed: the base model is left as it is)."""
    file = checkpoint / runs.CHECKPOINT_ADAPTER_NAME
    config = run.adapter_config
    params = ADAPTER_PARAMS[config.method]
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for comp, state in runs.read_checkpoint_tensors(file).items():
        for key, t in state.items():
            name, _, param = key.rpartition(".")
            if comp not in COMPONENTS or param not in params:
                raise AnalysisError(f"{file}: unexpected key {f'{comp}.{key}'!r} for a {config.method} checkpoint")
            found.setdefault((comp, module_name(comp, base.component(comp), name)), {})[param] = t
    shared: dict = {}  # DVoRA's frozen matrices, one pair per layer shape, as in add_adapters
    adapters = {}
    for (comp, name), p in sorted(found.items()):
        if set(p) != set(params):
            raise AnalysisError(f"{file}: {comp}.{name} is incomplete (has {sorted(p)})")
        adapter = make_adapter(_linear(base.component(comp), name, str(file)), config, name, shared)
        for param, t in p.items():
            target = getattr(adapter, param)
            if t.shape != target.shape:
                raise AnalysisError(
                    f"{file}: {comp}.{name}.{param} is {tuple(t.shape)}, the base model needs "
                    f"{tuple(target.shape)} (is it for another model?)"
                )
            target.copy_(t)
        adapters[(comp, name)] = adapter
    return adapters


def _adapter_file_adapters(file: Path, base: BaseModel) -> dict[tuple[str, str], AdapterLinear]:
    """An adapter file in any layout ``formats.diffusers`` reads, with its own method, rank and alpha."""
    tensors, meta, _ = read_adapter_file(file)
    comps = {c: base.component(c) for c in dict.fromkeys(k.partition(".")[0] for k in tensors) if c in COMPONENTS}
    if not comps:
        raise AnalysisError(f"{file}: no keys for {', '.join(COMPONENTS)}")
    planned, _ = plan_adapters(comps, tensors, meta, str(file))
    return planned


def _selected(name: str, layers: Sequence[str] | None) -> bool:
    return not layers or any(name_matches(name, p) for p in layers)


@torch.no_grad()
def _adapter_rows(run: RunSource, base: BaseModel, layers: Sequence[str] | None) -> Iterator[DecompositionRow]:
    for snap in run.snapshots:
        if snap.kind == "checkpoint":
            adapters = _checkpoint_adapters(snap.path, run, base)
        else:
            adapters = _adapter_file_adapters(snap.path, base)
        for (comp, name), adapter in sorted(adapters.items()):
            if _selected(name, layers):
                d = adapter_decomposition(adapter)
                yield DecompositionRow(run.label, adapter.method, snap.step, comp, name, d.delta_m, d.delta_d)


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """``{tensor name: file}`` over a model folder's safetensors files (sharded or not; the variant-free
    files first, so ``x.safetensors`` wins over ``x.fp16.safetensors``)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"), key=lambda p: (len(p.name.split(".")) > 2, p.name))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
        hint = f" (found {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
        raise AnalysisError(f"{folder}: no .safetensors weights{hint}")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                index.setdefault(key, file)
    return index


@torch.no_grad()
def _unet_rows(run: RunSource, base: BaseModel, layers: Sequence[str] | None) -> Iterator[DecompositionRow]:
    """Every ``nn.Linear`` of fine-tuned UNet folders against the base UNet, read one tensor at a time."""
    from safetensors import safe_open

    unet = base.component("unet")
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear) and _selected(n, layers)]
    for snap in run.snapshots:
        index = _safetensors_index(snap.path)
        missing = [n for n, _ in linears if f"{n}.weight" not in index]
        if missing:
            raise AnalysisError(
                f"{snap.path}: {len(missing)} Linear weights of the base UNet are missing "
                f"(e.g. {', '.join(missing[:3])}); is it for another model?"
            )
        rows: dict[str, DecompositionRow] = {}
        for file in dict.fromkeys(index[f"{n}.weight"] for n, _ in linears):  # each file opened once
            with safe_open(str(file), framework="pt") as f:
                for name, module in linears:
                    if index[f"{name}.weight"] != file:
                        continue
                    w = f.get_tensor(f"{name}.weight")
                    if w.shape != module.weight.shape:
                        raise AnalysisError(
                            f"{snap.path}: {name}.weight is {tuple(w.shape)}, the base's {tuple(module.weight.shape)}"
                        )
                    rows[name] = DecompositionRow(
                        run.label, FULL, snap.step, "unet", name, delta_m(w, module.weight), delta_d(w, module.weight)
                    )
        yield from (rows[n] for n, _ in linears)  # in the model's order


def source_rows(run: RunSource, base: BaseModel, layers: Sequence[str] | None = None) -> Iterator[DecompositionRow]:
    """ΔM and ΔD of every adapted matrix of ``run`` (every Linear of a fine-tuned UNet) at each of its
    snapshots, against ``base``; ``layers``: whole-name patterns to keep only some layers."""
    return (_unet_rows if run.method == FULL else _adapter_rows)(run, base, layers)
