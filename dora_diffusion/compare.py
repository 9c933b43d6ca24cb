"""Fair comparisons: LoRA, DoRA (and magnitude-only, DVoRA) trained on identical data order, seeds,
steps and settings, then one grid of fixed-seed samples, the weight-decomposition plot and a table."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig
from .evaluation import METRICS, verdict_lines
from .inject import METHODS


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or on CPU the peak resident set size (sampled
    every 20 ms from /proc) minus the RSS when the block started. ``None`` where neither is available."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak_bytes: int | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._rss()
        self._max = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                rss = self._rss()
                if rss is not None and self._max is not None:
                    self._max = max(self._max, rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        if self._start is not None and self._max is not None:
            self.peak_bytes = max(0, self._max - self._start)


@dataclass
class CompareConfig:
    """Which methods and ranks to compare; every other option comes from ``train`` (shared by all runs)."""

    train: TrainConfig
    methods: list[str] = field(default_factory=lambda: ["lora", "dora"])
    ranks: list[int] = field(default_factory=lambda: [8])
    validation_prompts: list[str] = field(default_factory=list)
    """Rows of the grid. Default: the instance prompt and two variations of it."""
    sample_steps: int = 25
    sample_size: int | None = None
    eval_seeds: int = 8
    """Sampling seeds per prompt for the metrics (subject fidelity, prompt fidelity, drift); 0 = no metrics."""
    dino: str | None = None
    """DINO model for subject fidelity; default on the embedded tiny model: the toy world's judge."""
    clip: str | None = None
    """CLIP model for prompt fidelity (CLIP-T) over the validation prompts other than the instance prompt."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods: must be a comma-separated subset of {', '.join(METHODS)}, got {self.methods}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"ranks: must be positive integers, got {self.ranks}")
        if not self.validation_prompts:
            p = self.train.prompt
            self.validation_prompts = [
                p,
                f"{p} on the beach",
                f"a watercolor painting of {p.removeprefix('a photo of ')}",
            ]


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Train every (method, rank) with the same seed and settings; write grid, analysis and summary."""
    from .analysis import analyze
    from .checkpoints import prepare_output
    from .models import load_pipeline
    from .sampling import Column, SampleSettings, image_grid, sample_columns
    from .train import train

    root = prepare_output(cfg.train)
    runs: list[dict[str, Any]] = []
    for method in cfg.methods:
        for rank in cfg.ranks:
            label = f"{method} r{rank}" if method != "magnitude" else "magnitude"
            if method == "magnitude" and any(r["method"] == "magnitude" for r in runs):
                continue  # rank does not apply: train it once
            out = root / label.replace(" ", "-")
            run_cfg = cfg.train.replace(
                method=method,
                rank=rank,
                output=str(out),
                resume=None,
                overwrite=cfg.train.overwrite,
                checkpoint_steps=cfg.train.checkpoint_steps or max(1, cfg.train.max_steps // 2),
            )
            with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as mem:
                started = time.perf_counter()
                result = train(run_cfg)
                wall = time.perf_counter() - started
            runs.append(
                {
                    "label": label,
                    "method": method,
                    "rank": rank if method != "magnitude" else None,
                    "output": str(out),
                    "trainable_parameters": result.trainable_parameters,
                    "adapter_file_bytes": result.adapter_file.stat().st_size,
                    "median_step_ms": result.median_step_seconds * 1000,
                    "train_seconds": wall,
                    "peak_memory_mib": None if mem.peak_bytes is None else mem.peak_bytes / 2**20,
                    "final_loss": result.final_loss,
                }
            )

    # the grid: rows = validation prompts, columns = runs (base first), same noise per row
    pipe = load_pipeline(cfg.train.model)
    pipe.set_progress_bar_config(disable=True)
    settings = [
        SampleSettings(
            prompt,
            seed=cfg.train.seed,
            steps=cfg.sample_steps,
            guidance=cfg.train.validation_guidance,
            width=cfg.sample_size,
            height=cfg.sample_size,
        )
        for prompt in cfg.validation_prompts
    ]
    columns = sample_columns(pipe, [Column("base"), *(Column(r["label"], r["output"]) for r in runs)], settings)
    rows = [[col.images[i][0] for col in columns] for i in range(len(settings))]
    grid = image_grid(rows, col_labels=[col.label for col in columns], row_labels=cfg.validation_prompts)
    grid_path = root / "grid.png"
    grid.save(grid_path)

    metrics = _metrics(cfg, pipe, runs)

    analysis = analyze([r["output"] for r in runs], root / "analysis", model=cfg.train.model)
    for run in runs:  # the analysis names a run by its folder
        run["delta_d_delta_m_correlation"] = analysis.get("by_run", {}).get(Path(run["output"]).name, {}).get("pearson")
    summary = {
        "settings": {
            **cfg.train.to_flat(),
            "methods": cfg.methods,
            "ranks": cfg.ranks,
            "validation_prompts": cfg.validation_prompts,
        },
        "runs": runs,
        "grid": str(grid_path),
        "analysis": analysis.get("files", {}),
        **metrics,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    table = summary_table(runs) + metrics_table(runs, metrics)
    (root / "summary.md").write_text(table)
    print(table)
    print(f"grid: {grid_path}\nanalysis: {analysis.get('files', {}).get('png', root / 'analysis')}")
    return summary


def _metrics(cfg: CompareConfig, pipe, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Subject fidelity, prompt fidelity and drift per run (into ``runs``), the base's, and verdict lines."""
    from .evaluation import Evaluator, judge_of, scene_prompts_for_judge
    from .models import resolve_model

    model_dir = Path(resolve_model(cfg.train.model))
    if cfg.eval_seeds < 1:
        return {}
    if not cfg.dino and judge_of(model_dir) is None:
        print("metrics: skipped (no DINO model given, and the base model has no toy-world judge); pass --dino")
        return {"metrics_skipped": "no DINO model and no judge"}
    others = [p for p in cfg.validation_prompts if p != cfg.train.prompt]
    scenes = {p: "" for p in others} if cfg.clip else scene_prompts_for_judge(others)
    ev = Evaluator(
        model_dir,
        cfg.train.data,
        cfg.train.prompt,
        cfg.train.class_prompt,
        scene_prompts=scenes,
        eval_seeds=cfg.eval_seeds,
        inference_steps=cfg.sample_steps,
        guidance=cfg.train.validation_guidance,
        dino=cfg.dino,
        clip=cfg.clip,
        pipe=pipe,
    )
    base = ev.evaluate(None)
    for run in runs:
        started = time.perf_counter()
        run["metrics"] = ev.evaluate(run["output"])
        run["metrics"]["seconds"] = time.perf_counter() - started
    return {"base_metrics": base, "metric_verdicts": metric_verdicts(runs)}


def metric_verdicts(runs: list[dict[str, Any]]) -> list[str]:
    """DoRA against LoRA at each rank, per metric: which is ahead and whether by more than the seed spread."""
    by = {(r["method"], r["rank"]): r for r in runs if "metrics" in r}
    return [
        f"{f.replace('_', ' ')}: {line}"
        for (method, rank), run in by.items()
        if method == "dora" and ("lora", rank) in by
        for f, line in verdict_lines(
            run["metrics"], by[("lora", rank)]["metrics"], (run["label"], by[("lora", rank)]["label"])
        )
    ]


def metrics_table(runs: list[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """The metrics per run as Markdown (empty when they were not computed)."""
    rows = [("base", metrics["base_metrics"])] if "base_metrics" in metrics else []
    rows += [(r["label"], r["metrics"]) for r in runs if "metrics" in r]
    if not rows:
        return ""
    kind = rows[0][1].get("prompt_fidelity_kind", "n/a")

    def cell(m: dict[str, Any], f: str) -> str:
        return f"{m[f]['mean']:.3f} ± {m[f]['std']:.3f} (n={m[f]['n']})" if f in m else "n/a"

    lines = [
        "",
        f"| model | subject fidelity ({rows[0][1]['embedding']}) | subject drawn | prompt fidelity ({kind}) | drift |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {label} | " + " | ".join(cell(m, f) for f in METRICS) + " |" for label, m in rows]
    lines += [
        "",
        f"{rows[0][1]['eval_seeds']} sampling seeds per prompt, the same for every model; ± is the std over images.",
    ]
    lines += [f"- {v}" for v in metrics.get("metric_verdicts", [])]
    return "\n".join(lines) + "\n"


def summary_table(runs: list[dict[str, Any]]) -> str:
    head = (
        "| run | trainable params | adapter file | median step | peak memory | final loss | r(ΔD, ΔM) |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in runs:
        mem = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f} MiB"
        corr = r.get("delta_d_delta_m_correlation")
        corr = "n/a" if corr is None or corr != corr else f"{corr:+.2f}"
        lines.append(
            f"| {r['label']} | {r['trainable_parameters']:,} | {r['adapter_file_bytes'] / 2**10:.0f} KiB | "
            f"{r['median_step_ms']:.0f} ms | {mem} | {r['final_loss']:.4f} | {corr} |"
        )
    return head + "\n".join(lines) + "\n"
