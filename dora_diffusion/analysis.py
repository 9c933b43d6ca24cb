"""Weight-decomposition analysis (DoRA paper §3.2, Eq. 2–4): how far each adapted matrix moved from
the base model in magnitude (ΔM) and in direction (ΔD), per layer and per checkpoint.

Over the OUTPUT rows ``n`` of a torch weight ``[out, in]`` (DoRA's magnitude axis, see ``layers``):

    ΔM = mean_n | ‖W'_n‖ − ‖W0_n‖ |          (DoRA: ‖W'_n‖ = m_n, so this is mean_n |m_n − ‖W0_n‖|)
    ΔD = mean_n (1 − cos(W'_n, W0_n))

The paper plots ΔD (x) against ΔM (y) for every layer at several checkpoints and finds a negative
correlation for full fine-tuning and DoRA, a positive one for LoRA. ``analyze`` does the same for
our training runs (LoRA, DoRA, DVoRA, magnitude-only) and for fully fine-tuned UNet folders, and writes
``decomposition.png`` / ``.csv`` / ``.json``.

``1 − cos`` is computed as ``½‖Ŵ'_n − Ŵ0_n‖²`` (unit rows; the same number), which keeps its
digits when the angle is small: ``1 − cos`` taken from the cosine itself is lost below ~1e-7 in fp32,
which is where short fine-tuning runs live.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from . import runs
from .formats.base import COMPONENTS, AdapterFileError, module_name
from .formats.diffusers import plan_adapters
from .formats.load import read_adapter_file, resolve_adapter_file
from .inject import ADAPTER_PARAMS, AdapterConfig, make_adapter, name_matches
from .layers import AdapterLinear, DoRALinear, MagnitudeLinear, acc, merged_weight, squared_row_norm

CSV_COLUMNS = ("run", "method", "step", "component", "layer", "delta_m", "delta_d")
OUTPUT_NAMES = {"png": "decomposition.png", "csv": "decomposition.csv", "json": "decomposition.json"}
FULL = "full"  # the method name of a fully fine-tuned UNet


class AnalysisError(ValueError):
    """A run, adapter or model folder that cannot be analysed; the message names it."""


# --------------------------------------------------------------------------------------------
# Pure math (paper Eq. 2–4)
# --------------------------------------------------------------------------------------------


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one accumulation dtype: fp32 for half precision, fp64 if either is fp64."""
    dtype = torch.promote_types(acc(a).dtype, acc(b).dtype)
    return a.to(dtype), b.to(dtype)


def row_magnitudes(w: torch.Tensor) -> torch.Tensor:
    """``‖W_n‖`` per output row of ``w: [out, in]``; a 1-D ``w`` already is one (a DoRA ``m: [out]``)."""
    if w.dim() == 1:
        return acc(w)
    if w.dim() != 2:
        raise ValueError(f"expected a weight [out, in] or a magnitude vector [out], got shape {tuple(w.shape)}")
    return squared_row_norm(w).sqrt()


def delta_m(w: torch.Tensor, w0: torch.Tensor) -> float:
    """ΔM = mean_n |‖W_n‖ − ‖W0_n‖| (paper Eq. 3). Either argument may be a magnitude vector ``[out]``."""
    m, m0 = _common(row_magnitudes(w), row_magnitudes(w0))
    if m.shape != m0.shape:
        raise ValueError(f"magnitudes of {tuple(w.shape)} and {tuple(w0.shape)} differ in length")
    return float((m - m0).abs().mean().detach())


def direction_change(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """``1 − cos(W_n, W0_n)`` per output row, ``[out]``, in [0, 2] (small angles keep their digits).

    A zero row has no direction: two zero rows count as unchanged (0), one zero row as orthogonal (1).
    """
    if w.shape != w0.shape or w.dim() != 2:
        raise ValueError(f"expected two weights of one shape [out, in], got {tuple(w.shape)} and {tuple(w0.shape)}")
    w, w0 = _common(w, w0)
    n, n0 = torch.linalg.vector_norm(w, dim=1), torch.linalg.vector_norm(w0, dim=1)  # [out]
    u = w / torch.where(n > 0, n, 1).unsqueeze(1)  # unit rows  [out, in]
    u0 = w0 / torch.where(n0 > 0, n0, 1).unsqueeze(1)
    d = 0.5 * (u - u0).square().sum(dim=1)  # ½‖û − û0‖² = 1 − cos
    d = torch.where((n > 0) & (n0 > 0), d, torch.where((n > 0) | (n0 > 0), 1.0, 0.0).to(d.dtype))
    return d.clamp(0.0, 2.0)


def delta_d(w: torch.Tensor, w0: torch.Tensor) -> float:
    """ΔD = mean_n (1 − cos(W_n, W0_n)) (paper Eq. 4)."""
    return float(direction_change(w, w0).mean())


class Decomposition(NamedTuple):
    delta_m: float
    delta_d: float


def layer_decomposition(
    w0: torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    magnitude: torch.Tensor | None = None,
) -> Decomposition:
    """ΔM and ΔD of one adapted matrix against its base ``w0: [out, in]``.

    LoRA (``A``, ``B``): of ``W' = W0 + s·B·A``; ΔM from ``W'``'s row norms.
    DoRA (``A``, ``B``, ``m``): ΔM from ``m`` (``‖W'_n‖ = m_n``), ΔD from ``W'``.
    Magnitude-only (``m``): ΔD is exactly 0 (``W'_n`` is ``W0_n`` rescaled by ``m_n / ‖W0_n‖``;
    2 for a row whose ``m_n`` turned negative).
    """
    _check_shapes(w0, lora_a, lora_b, magnitude)
    if lora_a is None and lora_b is None:
        if magnitude is None:
            raise ValueError("no adapter parameters: give lora_a and lora_b, magnitude, or all three")
        m = acc(magnitude)
        directions = torch.where(row_magnitudes(w0) > 0, 1.0 - torch.sign(m), 0.0)  # [out]
        return Decomposition(delta_m(m, w0), float(directions.mean()))
    if lora_a is None or lora_b is None:
        raise ValueError("lora_a and lora_b come together")
    w = merged_weight(w0, lora_a, lora_b, scale, magnitude)  # [out, in]
    return Decomposition(delta_m(w if magnitude is None else magnitude, w0), delta_d(w, w0))


@torch.no_grad()
def adapter_decomposition(adapter: AdapterLinear) -> Decomposition:
    """ΔM and ΔD of one adapter module against the base weight it wraps (which must be unmerged).

    Output-row magnitudes (DoRA, DVoRA, magnitude-only) go through ``layer_decomposition``; any other
    adapter (LoRA, DoRA with a per-input magnitude) through its own ``adapted_weight()``.
    """
    if adapter.merged:
        raise ValueError("the adapter is merged into its base weight; unmerge it first")
    w0 = adapter.base.weight
    if isinstance(adapter, MagnitudeLinear):
        return layer_decomposition(w0, magnitude=adapter.magnitude)
    if isinstance(adapter, DoRALinear):  # DVoRA too: its lora_A, lora_B are diag(d)·A, diag(b)·B
        return layer_decomposition(w0, adapter.lora_A, adapter.lora_B, adapter.scaling, adapter.magnitude)
    w = adapter.adapted_weight()  # [out, in]
    return Decomposition(delta_m(w, w0), delta_d(w, w0))


def _check_shapes(
    w0: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, magnitude: torch.Tensor | None
) -> None:
    if w0.dim() != 2:
        raise ValueError(f"base weight: expected [out, in], got {tuple(w0.shape)}")
    out, inp = w0.shape
    rank = lora_a.shape[0] if lora_a is not None and lora_a.dim() == 2 else -1
    expected = {"lora_A": (lora_a, (rank, inp)), "lora_B": (lora_b, (out, rank)), "magnitude": (magnitude, (out,))}
    bad = [
        f"{k} {tuple(t.shape)}, expected {shape}"
        for k, (t, shape) in expected.items()
        if t is not None and tuple(t.shape) != shape
    ]
    if bad:
        raise ValueError(f"does not fit the base weight {tuple(w0.shape)}: " + "; ".join(bad))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r of two samples; NaN for fewer than 2 points or a constant sample."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(np.clip(float(dx @ dy) / den, -1.0, 1.0)) if den > 0 else math.nan


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares line ``y = slope·x + intercept``; NaNs when ``x`` does not vary."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0:
        return math.nan, math.nan
    slope = float(dx @ (y - y.mean())) / sxx
    return slope, float(y.mean() - slope * x.mean())


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecompositionRow:
    run: str
    method: str
    step: int | None  # None: a final model whose step is not recorded
    component: str
    layer: str
    delta_m: float
    delta_d: float


@dataclass(frozen=True)
class Fit:
    """ΔM against ΔD over a group of rows: Pearson's r and the line ``ΔM = slope·ΔD + intercept``."""

    group: str
    method: str
    points: int
    pearson: float
    slope: float
    intercept: float


def _fit(group: str, rows: list[DecompositionRow]) -> Fit:
    x, y = [r.delta_d for r in rows], [r.delta_m for r in rows]
    return Fit(group, "+".join(sorted({r.method for r in rows})), len(rows), pearson(x, y), *linear_fit(x, y))


def _step_key(step: int | None) -> tuple[bool, int]:
    return (step is None, step or 0)


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file renamed into place: a failure leaves the old file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class AnalysisResult:
    """One row per (run, checkpoint, adapted matrix), and the ΔD–ΔM fits per method and per run."""

    rows: list[DecompositionRow] = field(default_factory=list)

    def runs(self) -> list[str]:
        return list(dict.fromkeys(r.run for r in self.rows))

    def steps(self, run: str) -> list[int | None]:
        return sorted({r.step for r in self.rows if r.run == run}, key=_step_key)

    def fits_by_method(self) -> dict[str, Fit]:
        methods = dict.fromkeys(r.method for r in self.rows)
        return {m: _fit(m, [r for r in self.rows if r.method == m]) for m in methods}

    def fits_by_run(self) -> dict[str, Fit]:
        return {run: _fit(run, [r for r in self.rows if r.run == run]) for run in self.runs()}

    def fits_by_checkpoint(self) -> dict[str, Fit]:
        """Per run and step (``run@step``): pooled fits also carry the common growth of ΔD and ΔM with
        training; within one checkpoint only the layers' spread is left."""
        keys = dict.fromkeys((r.run, r.step) for r in self.rows)
        return {
            f"{run}@{'final' if step is None else step}": _fit(
                run, [r for r in self.rows if (r.run, r.step) == (run, step)]
            )
            for run, step in keys
        }

    def to_csv(self, path: str | os.PathLike) -> Path:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                out = csv.writer(f)
                out.writerow(CSV_COLUMNS)
                for r in self.rows:
                    out.writerow(
                        [
                            r.run,
                            r.method,
                            "" if r.step is None else r.step,
                            r.component,
                            r.layer,
                            repr(r.delta_m),
                            repr(r.delta_d),
                        ]
                    )

        _write_atomic(Path(path), write)
        return Path(path)

    def summary(self) -> dict[str, Any]:
        """The fits as plain JSON-able dicts (NaN as None)."""

        def plain(fits: dict[str, Fit]) -> dict[str, dict]:
            return {k: {n: _finite(v) for n, v in asdict(f).items() if n != "group"} for k, f in fits.items()}

        return {
            "rows": len(self.rows),
            "by_method": plain(self.fits_by_method()),
            "by_run": plain(self.fits_by_run()),
            "by_checkpoint": plain(self.fits_by_checkpoint()),
            "steps": {run: self.steps(run) for run in self.runs()},
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        doc = {
            **self.summary(),
            "columns": list(CSV_COLUMNS),
            "data": [[_finite(v) for v in asdict(r).values()] for r in self.rows],
        }
        _write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n"))
        return Path(path)

    def __str__(self) -> str:
        lines = [f"{len(self.rows)} (layer, checkpoint) points; Pearson r of ΔD vs ΔM:"]
        for name, f in self.fits_by_run().items():
            if math.isfinite(f.pearson):
                fit = f"r = {f.pearson:+.3f}, ΔM = {f.slope:.4g}·ΔD + {f.intercept:.4g}"
            else:
                fit = _undefined(self.rows, name)
            lines.append(f"  {name} ({f.method}, {f.points} points): {fit}")
        return "\n".join(lines)


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
            local = Path(self.model).expanduser() if self.model is not None else None
            if local is not None and _is_unet_folder(local):
                self._folder = local.absolute()
            else:
                from .models import model_folder, resolve_model  # diffusers: imported when a model is loaded

                self._folder = model_folder(resolve_model(self.model)).absolute()
        return self._folder

    def component(self, name: str) -> nn.Module:
        if name not in self._components:
            self._components[name] = _load_component(self.folder, name)
        return self._components[name]


def _is_unet_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name") == "UNet2DConditionModel"
    except (OSError, ValueError, AttributeError):
        return False


def _load_component(folder: Path, name: str) -> nn.Module:
    """One SDXL component of a model folder (safetensors only, offline), frozen, on the CPU."""
    if name not in COMPONENTS:
        raise AnalysisError(f"{name}: not an SDXL component with adapters ({', '.join(COMPONENTS)})")
    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if _is_unet_folder(folder):
        if name != "unet":
            raise AnalysisError(f"{folder}: is a UNet folder; it has no {name}")
    else:
        kw["subfolder"] = name
    try:
        if name == "unet":
            from diffusers import UNet2DConditionModel

            module = UNet2DConditionModel.from_pretrained(folder, **kw)
        else:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
            module = cls.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{folder}: cannot load its {name} ({type(e).__name__}: {e})") from None
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Runs: what a path holds, and its snapshots (checkpoints)
# --------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    step: int | None
    path: Path
    kind: str  # "checkpoint" (our internal keys), "adapter" (an adapter file), "unet" (a full UNet folder)


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
    return sorted(found, key=lambda s: _step_key(s.step))


def _run_adapter_config(cfg: dict[str, Any], where: Path) -> AdapterConfig:
    """The adapters a run was trained with, as the trainer builds them (``TrainConfig.adapter_config``)."""
    from dataclasses import fields

    from .config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in cfg.items() if k in known}).adapter_config()
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
            [Snapshot(int(state["step"]), path / runs.CHECKPOINT_ADAPTER_NAME, "checkpoint")],
            acfg.method,
            acfg,
        )
    cfg = runs.read_run_config(path)
    if cfg is not None:
        acfg = _run_adapter_config(cfg, runs.config_file(path))
        snaps = [
            Snapshot(runs.step_in_path(p), p / runs.CHECKPOINT_ADAPTER_NAME, "checkpoint")
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
            path, path.name, runs.base_model(path), sorted(snaps, key=lambda s: _step_key(s.step)), acfg.method, acfg
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
def _checkpoint_adapters(file: Path, run: RunSource, base: BaseModel) -> dict[tuple[str, str], AdapterLinear]:
    """A training checkpoint (``<component>.<module>.<param>`` keys) as the adapters the trainer built,
    around the base model's Linear layers (not installed: the base model is left as it is)."""
    tensors, _, _ = read_adapter_file(file)
    config = run.adapter_config
    params = ADAPTER_PARAMS[config.method]
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        name, _, param = rest.rpartition(".")
        if comp not in COMPONENTS or param not in params:
            raise AnalysisError(f"{file}: unexpected key {key!r} for a {config.method} checkpoint")
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


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def analyze_runs(
    runs: Iterable[str | os.PathLike], model: str | None = None, *, layers: Sequence[str] | None = None
) -> AnalysisResult:
    """ΔM and ΔD of every adapted matrix of every run at each of its checkpoints.

    ``runs``: training run folders (``checkpoints/checkpoint-N/adapter.safetensors`` and the final
    ``pytorch_lora_weights.safetensors``, used when no checkpoint has its step), single checkpoint
    folders, adapter files, or full fine-tuning outputs (UNet folders, ``checkpoint-N/unet``). ``model``: the base
    model to compare against; default what each run recorded (the embedded tiny model when nothing is recorded).
    ``layers``: whole-name patterns (``to_q``, ``attn1.to_*``) to keep only some layers.
    Base weights are loaded once per model.
    """
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    sources = [describe_run(p) for p in runs]
    if not sources:
        raise AnalysisError("no runs given")
    seen: dict[str, int] = {}
    for s in sources:  # unique labels: the folder name, numbered when two runs share one
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label = f"{s.label} ({seen[s.label]})"
    bases: dict[str, BaseModel] = {}
    result = AnalysisResult()
    for s in sources:
        candidate = BaseModel(model if model is not None else s.model)
        base = bases.setdefault(candidate.folder.as_posix(), candidate)
        rows = list((_unet_rows if s.method == FULL else _adapter_rows)(s, base, layers))
        if not rows:
            raise AnalysisError(f"{s.path}: no adapted layers" + (f" match {list(layers)}" if layers else ""))
        result.rows += rows
    return result


def analyze_unet_folder(
    finetuned: str | os.PathLike | Sequence[str | os.PathLike],
    base_model: str | None = None,
    *,
    layers: Sequence[str] | None = None,
) -> AnalysisResult:
    """Full fine-tuning: every Linear weight of fine-tuned UNet folder(s) against ``base_model``'s UNet
    (``None``: the embedded tiny model). A folder may be a UNet folder, a pipeline folder or a training
    output with ``checkpoint-N/unet`` folders (labelled by step)."""
    paths = [finetuned] if isinstance(finetuned, (str, os.PathLike)) else list(finetuned)
    for p in paths:
        if describe_run(p).method != FULL:
            raise AnalysisError(f"{p}: not a UNet folder (config.json of a UNet2DConditionModel)")
    return analyze_runs(paths, base_model, layers=layers)


def _undefined(rows: list[DecompositionRow], run: str) -> str:
    pts = [r for r in rows if r.run == run]
    if len({r.delta_d for r in pts}) == 1:
        return f"r undefined: ΔD = {pts[0].delta_d:g} everywhere"
    if len({r.delta_m for r in pts}) == 1:
        return f"r undefined: ΔM = {pts[0].delta_m:g} everywhere"
    return "r undefined"


def plot_decomposition(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """``decomposition_figure`` as a PNG."""
    fig = decomposition_figure(result)
    out = Path(path)
    _write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return out


def decomposition_figure(result: AnalysisResult):
    """A figure in the manner of the paper's Figure 2: ΔD (x) against ΔM (y), one panel per run, points
    coloured by checkpoint step, the least-squares line, and Pearson's r in the title."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = result.runs()
    if not runs:
        raise AnalysisError("nothing to plot: the analysis has no rows")
    fits = result.fits_by_run()
    cols = min(4, len(runs))  # wrap into rows of at most four panels
    rows_n = -(-len(runs) // cols)
    fig = Figure(figsize=(4.4 * cols, 4.0 * rows_n), layout="constrained")
    FigureCanvasAgg(fig)
    for i, run in enumerate(runs):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        steps = result.steps(run)
        colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(steps)))
        for step, colour in zip(steps, colours, strict=True):
            pts = [r for r in result.rows if r.run == run and r.step == step]
            ax.scatter(
                [r.delta_d for r in pts],
                [r.delta_m for r in pts],
                s=16,
                color=colour,
                alpha=0.85,
                edgecolors="none",
                label="final" if step is None else f"step {step}",
            )
        fit = fits[run]
        if math.isfinite(fit.slope):
            xs = np.array(
                [
                    min(r.delta_d for r in result.rows if r.run == run),
                    max(r.delta_d for r in result.rows if r.run == run),
                ]
            )
            ax.plot(xs, fit.slope * xs + fit.intercept, color="black", linestyle="--", linewidth=1)
        r_text = f"r = {fit.pearson:+.2f}" if math.isfinite(fit.pearson) else _undefined(result.rows, run)
        # Layout: the title wraps to its panel's width and sits clear above the axis multiplier (×10⁻³);
        # no additive offsets ("+1.2×10⁴"), whose long text runs into the axis label, and so few enough
        # x ticks for their longer labels.
        name = textwrap.fill(f"{fit.method}: {run}", 44, break_on_hyphens=False)
        ax.set_title(f"{name}\n{r_text} ({fit.points} points)", fontsize=10, pad=16)
        ax.set_xlabel("ΔD  (mean 1 − cos, per row)")
        ax.set_ylabel("ΔM  (mean |‖W′ₙ‖ − ‖W0ₙ‖|)" if i == 0 else "")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3), useMathText=True, useOffset=False)
        ax.locator_params(axis="x", nbins=4)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="checkpoint", title_fontsize=8, loc="best", ncol=1 + (len(steps) - 1) // 10)
    return fig


def analyze(
    runs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    model: str | None = None,
    *,
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``analyze_runs`` + ``decomposition.png``, ``.csv`` and ``.json`` in ``out_dir`` (written only once
    every run has been read; earlier files of these names are replaced). Returns the summary: the
    fits per method and per run, the steps seen, and the files written."""
    result = analyze_runs(runs, model, layers=layers)
    out = Path(out_dir)
    files = {
        "png": plot_decomposition(result, out / OUTPUT_NAMES["png"]),
        "csv": result.to_csv(out / OUTPUT_NAMES["csv"]),
        "json": result.to_json(out / OUTPUT_NAMES["json"]),
    }
    return {**result.summary(), "files": {k: str(v) for k, v in files.items()}, "text": str(result)}


__all__ = [
    "AnalysisError",
    "AnalysisResult",
    "Decomposition",
    "DecompositionRow",
    "Fit",
    "analyze",
    "analyze_runs",
    "adapter_decomposition",
    "analyze_unet_folder",
    "delta_d",
    "delta_m",
    "describe_run",
    "direction_change",
    "layer_decomposition",
    "linear_fit",
    "pearson",
    "plot_decomposition",
    "row_magnitudes",
]
