"""The Compare tab's numbers: base, LoRA and DoRA scored on the same sampling seeds (``evaluation.Evaluator``).

Subject fidelity against the photos the adapter was trained on (read from its run's config), subject drawn and
drift on the embedded model's judge (or DINO given to the engine), and one line per metric saying which adapter is
ahead and whether the gap exceeds the seed-to-seed spread (``metrics.ahead``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import runs
from .errors import EngineError

NAMES = {"subject_fidelity": "subject fidelity", "subject_drawn": "subject drawn", "drift": "drift from the base"}


def training_data(adapter: Path) -> Path:
    """The subject folder an adapter's run was trained on."""
    run = adapter if adapter.is_dir() else adapter.parent
    config = runs.read_run_config(run) or {}
    data = config.get("data")
    if not data or not Path(data).is_dir():
        raise EngineError(f"{adapter}: its run does not record an existing subject folder to measure against")
    return Path(data)


def score_columns(
    pipe,
    model_dir: Path,
    adapters: dict[str, Path],
    prompt: str,
    class_prompt: str,
    eval_seeds: int,
    steps: int,
    guidance: float,
    dino: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Scores of the base and of each adapter (label -> scores), and the Markdown shown under the images."""
    from ..evaluation import METRICS, Evaluator, check_embedders, verdict_lines

    check_embedders(model_dir, dino, None, prompt_fidelity=False)
    if not adapters:
        raise EngineError("choose a LoRA or a DoRA adapter to measure")
    data = training_data(next(iter(adapters.values())))
    ev = Evaluator(
        model_dir,
        data,
        prompt,
        class_prompt,
        eval_seeds=eval_seeds,
        inference_steps=steps,
        guidance=guidance,
        dino=dino,
        pipe=pipe,
    )
    scores = {"base": ev.evaluate(None)}
    for label, path in adapters.items():
        scores[label] = ev.evaluate(path)
    fields = [f for f in METRICS if f in NAMES and any(f in s for s in scores.values())]
    lines = [
        f"**Measured** on {eval_seeds} seeds ({ev.embedding} embedding; subject photos: `{data.name}`): "
        f"'{prompt}' for the subject, '{class_prompt}' for drift.",
        "",
        "| | " + " | ".join(NAMES[f] for f in fields) + " |",
        "|---|" + "---:|" * len(fields),
    ]
    for label, s in scores.items():
        cells = [f"{s[f]['mean']:.3f} ± {s[f]['std']:.3f}" if f in s else "–" for f in fields]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "LoRA" in scores and "DoRA" in scores:
        lines.append("")
        verdicts = verdict_lines(scores["DoRA"], scores["LoRA"], ("DoRA", "LoRA"))
        lines += [f"- {NAMES[f]}: {line}" for f, line in verdicts if f in NAMES]
    return scores, "\n".join(lines)
