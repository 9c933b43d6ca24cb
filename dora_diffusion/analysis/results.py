"""What the analysis finds: one row per (run, checkpoint, adapted matrix), the ΔD–ΔM fits over groups of
rows, and the files they are written to (``decomposition.csv``, ``decomposition.json``)."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .decomposition import linear_fit, pearson

CSV_COLUMNS = ("run", "method", "step", "component", "layer", "delta_m", "delta_d")
OUTPUT_NAMES = {"png": "decomposition.png", "csv": "decomposition.csv", "json": "decomposition.json"}


class AnalysisError(ValueError):
    """A run, adapter or model folder that cannot be analysed; the message names it."""


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


def step_key(step: int | None) -> tuple[bool, int]:
    return (step is None, step or 0)


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def write_atomic(path: Path, write) -> None:
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
        return sorted({r.step for r in self.rows if r.run == run}, key=step_key)

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

        write_atomic(Path(path), write)
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
        write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n"))
        return Path(path)

    def __str__(self) -> str:
        lines = [f"{len(self.rows)} (layer, checkpoint) points; Pearson r of ΔD vs ΔM:"]
        for name, f in self.fits_by_run().items():
            if math.isfinite(f.pearson):
                fit = f"r = {f.pearson:+.3f}, ΔM = {f.slope:.4g}·ΔD + {f.intercept:.4g}"
            else:
                fit = undefined_fit_text(self.rows, name)
            lines.append(f"  {name} ({f.method}, {f.points} points): {fit}")
        return "\n".join(lines)


def undefined_fit_text(rows: list[DecompositionRow], run: str) -> str:
    """Why Pearson's r of ``run``'s points is undefined: which of ΔD and ΔM does not vary."""
    pts = [r for r in rows if r.run == run]
    if len({r.delta_d for r in pts}) == 1:
        return f"r undefined: ΔD = {pts[0].delta_d:g} everywhere"
    if len({r.delta_m for r in pts}) == 1:
        return f"r undefined: ΔM = {pts[0].delta_m:g} everywhere"
    return "r undefined"
