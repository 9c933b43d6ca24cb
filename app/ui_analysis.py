"""The Analysis tab: the DoRA paper's weight-decomposition analysis of runs and checkpoints."""

from __future__ import annotations

import gradio as gr
from ui_shared import open_image, shown

from dora_diffusion.engine import Engine


def analysis_tab(engine: Engine, choices, lora_default: str | None, dora_default: str | None):
    """The tab's components; returns its runs picker and ``wire()``, its events."""
    with gr.Tab("Analysis", id="analysis"):
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                analysis_runs = gr.Dropdown(
                    choices,
                    value=[v for v in (lora_default, dora_default) if v],
                    multiselect=True,
                    label="Runs",
                    allow_custom_value=True,
                    info="runs or checkpoints in the workspace",
                )
                analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
                gr.Markdown(
                    "The DoRA paper's weight-decomposition analysis (§3.2): for every adapted "
                    "matrix and checkpoint, the change in magnitude ΔM against the change in "
                    "direction ΔD from the base weights. The paper finds a negative correlation "
                    "for full fine-tuning and DoRA, a positive one for LoRA."
                )
            with gr.Column(scale=3):
                analysis_plot = gr.Image(label="ΔD vs ΔM", interactive=False, type="pil")
                analysis_text = gr.Markdown()

    def wire() -> None:
        @shown
        def do_analyze(runs):
            png, text = engine.analyze(runs or [])
            return open_image(png), "```\n" + text + "\n```"

        analyze_btn.click(
            do_analyze,
            [analysis_runs],
            [analysis_plot, analysis_text],
            api_name="analyze",
            concurrency_id="device",
            concurrency_limit=1,
        )

    return analysis_runs, wire
