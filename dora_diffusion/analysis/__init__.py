"""Weight-decomposition analysis (DoRA paper §3.2, Eq. 2–4): how far each adapted matrix moved from
the base model in magnitude (ΔM) and in direction (ΔD), per layer and per checkpoint.

The paper plots ΔD (x) against ΔM (y) for every layer at several checkpoints and finds a negative
correlation for full fine-tuning and DoRA, a positive one for LoRA. ``analyze`` does the same for
our training runs (LoRA, DoRA, DVoRA, magnitude-only) and for fully fine-tuned UNet folders, and writes
``decomposition.png`` / ``.csv`` / ``.json``.

- ``decomposition``: the pure math (ΔM, ΔD of one matrix, of one adapter; Pearson's r, the line fit);
- ``sources``: what a path holds (``describe_run``: runs, checkpoints, adapter files, UNet folders), the
  base model it is compared against, and the rows of every adapted matrix;
- ``results``: the rows, the fits over them, the CSV and JSON files;
- ``plots``: the figure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .decomposition import (
    Decomposition,
    adapter_decomposition,
    delta_d,
    delta_m,
    direction_change,
    layer_decomposition,
    linear_fit,
    pearson,
    row_magnitudes,
)
from .plots import decomposition_figure, plot_decomposition
from .results import CSV_COLUMNS, OUTPUT_NAMES, AnalysisError, AnalysisResult, DecompositionRow, Fit
from .sources import FULL, BaseModel, RunSource, Snapshot, describe_run, source_rows


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
        rows = list(source_rows(s, base, layers))
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
    "CSV_COLUMNS",
    "FULL",
    "OUTPUT_NAMES",
    "AnalysisError",
    "AnalysisResult",
    "BaseModel",
    "Decomposition",
    "DecompositionRow",
    "Fit",
    "RunSource",
    "Snapshot",
    "adapter_decomposition",
    "analyze",
    "analyze_runs",
    "analyze_unet_folder",
    "decomposition_figure",
    "delta_d",
    "delta_m",
    "describe_run",
    "direction_change",
    "layer_decomposition",
    "linear_fit",
    "pearson",
    "plot_decomposition",
    "row_magnitudes",
    "source_rows",
]
