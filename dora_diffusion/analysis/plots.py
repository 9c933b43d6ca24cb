"""The analysis as a picture, in the manner of the DoRA paper's Figure 2: ΔD (x) against ΔM (y) per layer."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np

from .results import AnalysisError, AnalysisResult, undefined_fit_text, write_atomic


def plot_decomposition(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """``decomposition_figure`` as a PNG."""
    fig = decomposition_figure(result)
    out = Path(path)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
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
        r_text = f"r = {fit.pearson:+.2f}" if math.isfinite(fit.pearson) else undefined_fit_text(result.rows, run)
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
