"""``dora-diffusion sweep``: LoRA vs DoRA (optionally magnitude-only and DVoRA) at several ranks and seeds.

Every cell (method, rank, training seed) is trained with identical settings and evaluated on the same
prompts and sampling seeds, then the cells are summarised per (method, rank) over the training seeds:

- subject fidelity: DINO (or, on the embedded tiny model, the toy world's judge embedding) of the instance
  prompt's images against the subject's photos (``metrics.subject_fidelity``);
- subject drawn: on the embedded model, how often the judge reads the subject (teal robot with a heart);
- prompt fidelity: CLIP-T of the scene prompts' images when a CLIP model is given; on the embedded model
  the judge's rate of keeping the scene each prompt asks for;
- drift: ``1 - cos`` of the class prompt's images against the base model's, same seeds (``metrics.drift``);
- step time, trainable parameters, final loss: from the training run itself.

The spread of a row is the standard deviation across training seeds (each seed's value being the mean over
the sampling seeds), which is what "is the difference larger than chance" is about. Resumable: a finished
cell (``cells/<name>/cell.json`` with the same settings) is read back, not retrained.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError
from .demo import SNR_GAMMA
from .evaluation import LOWER_IS_BETTER, METRICS, Evaluator, check_embedders, verdict_lines
from .inject import METHODS

CELL_FILE = "cell.json"
TABLE_FIELDS = METRICS


@dataclass
class SweepConfig:
    """What to sweep and how each cell is trained and judged."""

    output: str
    data: str
    prompt: str
    class_prompt: str
    model: str | None = None
    methods: tuple[str, ...] = ("lora", "dora")
    ranks: tuple[int, ...] = (4, 8, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    learning_rate: float = 3e-3
    snr_gamma: float | None = SNR_GAMMA
    """Min-SNR-γ loss weighting (None: off); the demo's by default."""
    targets: str = "attn+ff"
    num_class_images: int = 50
    scene_prompts: dict[str, str] = field(default_factory=dict)
    """Prompts with the identifier and the scene each asks for ("sks toy on the grass": "grass")."""
    eval_seeds: int = 16
    inference_steps: int = 25
    guidance: float = 5.0
    dino: str | None = None
    """A DINO model (local folder or cached hub id) for subject fidelity; default on the embedded model: its judge."""
    clip: str | None = None
    """A CLIP model for prompt fidelity (CLIP-T); default on the embedded model: the judge's scene rate."""
    threads: int | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """Further ``TrainConfig`` fields, the same for every cell."""
    overwrite: bool = False
    """Retrain finished cells that were made with other settings (otherwise the sweep refuses)."""

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHODS)}")
        if not self.methods or not self.ranks or not self.seeds:
            raise ConfigError("methods, ranks, seeds: each needs at least one value")
        for r in self.ranks:
            if int(r) < 1:
                raise ConfigError(f"ranks: must be at least 1, got {r}")
        if self.eval_seeds < 2:
            raise ConfigError(f"eval_seeds: need at least 2 to measure a spread, got {self.eval_seeds}")
        if not self.class_prompt:
            raise ConfigError("class_prompt: the sweep measures drift on the class prompt; give one")

    def cell_settings(self) -> dict[str, Any]:
        """What every cell shares (the subject folder by its content, not its path): a finished cell on
        disk is reused only when these match."""
        skip = ("output", "methods", "ranks", "seeds", "threads", "overwrite")
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        settings["data"] = folder_digest(self.data)
        return settings


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over the names and bytes of a folder's files (not recursive): the same photos anywhere."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cell_name(method: str, rank: int, seed: int) -> str:
    return f"{method}-r{rank}-seed{seed}"


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train_cell(cfg: SweepConfig, method: str, rank: int, seed: int, run: Path, class_dir: Path):
    from .config import TrainConfig
    from .train import train

    settings = dict(
        data=cfg.data,
        prompt=cfg.prompt,
        output=str(run),
        model=cfg.model,
        method=method,
        rank=int(rank),
        targets=cfg.targets,
        learning_rate=cfg.learning_rate,
        snr_gamma=cfg.snr_gamma,
        max_steps=cfg.steps,
        seed=int(seed),
        class_prompt=cfg.class_prompt,
        class_data=str(class_dir),
        num_class_images=cfg.num_class_images,
        validation_steps=0,
        num_validation_images=1,
        checkpoint_steps=0,
        report_to="none",
        overwrite=True,
    )
    settings.update(cfg.train_overrides)
    return train(TrainConfig(**settings))


def run_sweep(cfg: SweepConfig, progress=print) -> dict[str, Any]:
    """Train and evaluate every missing cell, then write ``sweep.json``, ``sweep.csv``, ``sweep.md`` and
    ``sweep.png`` under ``cfg.output``. Returns the summary."""
    from .models import resolve_model
    from .threads import set_torch_threads

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    set_torch_threads(cfg.threads, model=None)
    model_dir = Path(resolve_model(cfg.model))
    check_embedders(model_dir, cfg.dino, cfg.clip, bool(cfg.scene_prompts))
    settings = cfg.cell_settings()
    fingerprint = _fingerprint(settings)
    (out / "sweep_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n", encoding="utf-8")
    evaluator: Evaluator | None = None
    base_file = out / "base.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    if base is not None and base.get("fingerprint") != fingerprint:
        base = None
    cells: list[dict[str, Any]] = []
    grid = [(m, r, s) for r in cfg.ranks for s in cfg.seeds for m in cfg.methods]  # methods alternate
    for i, (method, rank, seed) in enumerate(grid, 1):
        name = cell_name(method, rank, seed)
        folder = out / "cells" / name
        done = folder / CELL_FILE
        if done.is_file():
            cell = json.loads(done.read_text())
            if cell.get("fingerprint") == fingerprint:
                progress(f"[{i}/{len(grid)}] {name}: done before, read back")
                cells.append(cell)
                continue
            if not cfg.overwrite:
                raise ConfigError(
                    f"output: {folder} is a finished cell made with other settings; use another --output, "
                    "or --overwrite to retrain it"
                )
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished cell (no cell.json), or --overwrite: ours to replace
        progress(f"[{i}/{len(grid)}] {name}: training {cfg.steps} steps")
        t = time.perf_counter()
        result = _train_cell(cfg, method, rank, seed, folder / "run", out / "class_images")
        train_seconds = time.perf_counter() - t
        if evaluator is None:
            evaluator = Evaluator(
                model_dir,
                cfg.data,
                cfg.prompt,
                cfg.class_prompt,
                scene_prompts=cfg.scene_prompts,
                eval_seeds=cfg.eval_seeds,
                inference_steps=cfg.inference_steps,
                guidance=cfg.guidance,
                dino=cfg.dino,
                clip=cfg.clip,
            )
        if evaluator.base_class is None:
            base = {"fingerprint": fingerprint, **evaluator.evaluate(None)}
            base_file.write_text(json.dumps(base, indent=2) + "\n", encoding="utf-8")
        t = time.perf_counter()
        scores = evaluator.evaluate(result.adapter_file)
        cell = {
            "name": name,
            "method": method,
            "rank": int(rank),
            "seed": int(seed),
            "fingerprint": fingerprint,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "step_ms": result.median_step_seconds * 1000,
            "trainable_parameters": result.trainable_parameters,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - t,
            "adapter": str(result.adapter_file),
            **scores,
        }
        tmp = folder / (CELL_FILE + ".tmp")
        tmp.write_text(json.dumps(cell, indent=2) + "\n", encoding="utf-8")
        tmp.replace(done)
        cells.append(cell)
        progress(
            f"    subject fidelity {cell['subject_fidelity']['mean']:.4f}"
            + (f", drift {cell['drift']['mean']:.4f}" if "drift" in cell else "")
        )
    rows = summarise(cells, cfg)
    summary = {
        "model": str(model_dir),
        "settings": settings,
        "base": base,
        "rows": rows,
        "cells": cells,
        "verdicts": verdicts(rows),
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_csv(rows, out / "sweep.csv")
    (out / "sweep.md").write_text(markdown_table(rows, summary["verdicts"], base), encoding="utf-8")
    plot(rows, out / "sweep.png")
    return summary


def summarise(cells: list[dict[str, Any]], cfg: SweepConfig) -> list[dict[str, Any]]:
    """One row per (method, rank): each field's mean and std across training seeds."""
    rows = []
    for rank in cfg.ranks:
        for method in cfg.methods:
            group = [c for c in cells if c["method"] == method and c["rank"] == int(rank)]
            if not group:
                continue
            row: dict[str, Any] = {
                "method": method,
                "rank": int(rank),
                "seeds": len(group),
                "eval_seeds": group[0]["eval_seeds"],
            }
            for f in TABLE_FIELDS + ("step_ms", "final_loss", "trainable_parameters"):
                values = [c[f]["mean"] if isinstance(c.get(f), dict) else c.get(f) for c in group]
                values = [float(v) for v in values if v is not None]
                if values:
                    row[f] = {
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "n": len(values),
                    }
            row["prompt_fidelity_kind"] = group[0].get("prompt_fidelity_kind")
            rows.append(row)
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per rank and metric: DoRA against LoRA, and whether the gap exceeds the seed-to-seed spread."""
    by = {(r["method"], r["rank"]): r for r in rows}
    return [
        f"rank {rank}, {f.replace('_', ' ')}: {line}"
        for (method, rank), row in by.items()
        if method == "dora" and ("lora", rank) in by
        for f, line in verdict_lines(row, by[("lora", rank)], ("DoRA", "LoRA"))
    ]


def _cell_text(value: Any, digits: int = 3) -> str:
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = ["method", "rank", "seeds", "eval_seeds"]
    stats = [f for f in TABLE_FIELDS + ("step_ms", "final_loss", "trainable_parameters") if any(f in r for r in rows)]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols + [f"{f}_{s}" for f in stats for s in ("mean", "std")])
        for r in rows:
            w.writerow([r[c] for c in cols] + [r.get(f, {}).get(s, "") for f in stats for s in ("mean", "std")])


def markdown_table(rows: list[dict[str, Any]], lines: list[str], base: dict[str, Any] | None = None) -> str:
    """The table (one row per method and rank, the base model's first when given) and the verdict lines."""
    kind = next((r["prompt_fidelity_kind"] for r in rows if r.get("prompt_fidelity_kind")), None)
    head = [
        "method",
        "rank",
        "subject fidelity ↑",
        "subject drawn ↑",
        f"prompt fidelity ↑ ({kind or 'n/a'})",
        "drift ↓",
        "step ms",
        "trainable params",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base is not None:  # one model state, so its ± is the spread over sampling seeds
        cells = [
            _cell_text(base.get("subject_fidelity")),
            _cell_text(base.get("subject_drawn"), 2),
            _cell_text(base.get("prompt_fidelity"), 2),
            "0",
            "",
            "",
        ]
        out.append("| base model | | " + " | ".join(cells) + " |")
    for r in rows:
        params = f"{int(r['trainable_parameters']['mean']):,}" if "trainable_parameters" in r else ""
        out.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    str(r["rank"]),
                    _cell_text(r.get("subject_fidelity")),
                    _cell_text(r.get("subject_drawn"), 2),
                    _cell_text(r.get("prompt_fidelity"), 2),
                    _cell_text(r.get("drift")),
                    _cell_text(r.get("step_ms"), 0),
                    params,
                ]
            )
            + " |"
        )
    seeds = rows[0]["seeds"] if rows else 0
    evals = rows[0]["eval_seeds"] if rows else 0
    out.append("")
    out.append(
        f"Mean ± std across {seeds} training seeds; each seed's value is the mean over {evals} sampling seeds"
        + (" (the base model's ± is the spread over those sampling seeds)." if base is not None else ".")
    )
    out += [""] + [f"- {line}" for line in lines]
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The paper's Fig. 5 for diffusion: each metric against rank, one line per method, error bars = seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [f for f in TABLE_FIELDS if any(f in r for r in rows)]
    fig, axes = plt.subplots(1, len(fields), figsize=(3.6 * len(fields), 3.2), squeeze=False)
    for ax, f in zip(axes[0], fields, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["rank"], r[f]["mean"], r[f]["std"]) for r in rows if r["method"] == method and f in r]
            if pts:
                ranks, means, stds = zip(*pts, strict=True)
                ax.errorbar(ranks, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["rank"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("rank")
        ax.set_title(f.replace("_", " ") + (" (lower is better)" if f in LOWER_IS_BETTER else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
