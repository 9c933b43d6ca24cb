"""The Export tab: a run in the format a tool reads, and how to load it there."""

from __future__ import annotations

import gradio as gr
from ui_shared import shown

from dora_diffusion.engine import EXPORT_DTYPES, Engine

FORMATS = [
    ("diffusers: pipe.load_lora_weights", "diffusers"),
    ("comfyui: ComfyUI, Forge", "comfyui"),
    ("kohya: LyCORIS, sd-scripts", "kohya"),
    ("merged model: diffusers folder (zip)", "merged-folder"),
    ("merged model: one .safetensors (SDXL layout): A1111, ComfyUI, from_single_file", "merged-single"),
]
USAGE = {
    "diffusers": "```python\npipe = StableDiffusionXLPipeline.from_pretrained(base)\n"
    "pipe.load_lora_weights('{file}')\n```",
    "comfyui": "Copy `{file}` into `ComfyUI/models/loras/` or Forge's `models/Lora/`. Its DoRA magnitudes are "
    "written for their formula (they divide by the base weight's norm): for LyCORIS, sd-scripts, or a "
    "ComfyUI that has merged its fix (Comfy-Org/ComfyUI#15458), export `kohya` instead.",
    "kohya": "For LyCORIS and sd-scripts (`--network_module lycoris.kohya`, the file's `ss_network_args`). "
    "ComfyUI and Forge read a DoRA file of this kind approximately: export `comfyui` for them.",
    "merged-folder": "Unzip it, then\n"
    "```python\npipe = StableDiffusionXLPipeline.from_pretrained('<unzipped folder>')\n```",
    "merged-single": "```python\npipe = StableDiffusionXLPipeline.from_single_file('{file}')\n```\nor copy it into "
    "`ComfyUI/models/checkpoints/` or A1111's `models/Stable-diffusion/` (the exact file for A1111).",
}


def export_tab(engine: Engine, choices, lora_default: str | None, dora_default: str | None):
    """The tab's components; returns its run picker and ``wire()``, its events."""
    with gr.Tab("Export", id="export"):
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                run = gr.Dropdown(
                    choices,
                    value=dora_default or lora_default or "",
                    label="Run",
                    allow_custom_value=True,
                    info="a run, or a path in the workspace",
                )
                fmt = gr.Radio(FORMATS, value="diffusers", label="Format")
                dtype = gr.Radio(list(EXPORT_DTYPES), value="float32", label="Precision")
                export = gr.Button("Export", variant="primary", elem_id="export")
            with gr.Column(scale=3):
                download = gr.File(label="Download", interactive=False)
                usage = gr.Markdown(
                    "Pick a run and a format. Merged formats bake the adapter into the "
                    "base model: no adapter at inference, no extra cost."
                )

    def wire() -> None:
        @shown
        def do_export(run, fmt, dtype):
            path = engine.export(run, fmt, dtype)
            return str(path), f"**{path.name}** ({path.stat().st_size / 2**20:.1f} MB)\n\n" + USAGE[fmt].format(
                file=path.name
            )

        export.click(
            do_export,
            [run, fmt, dtype],
            [download, usage],
            api_name="export",
            concurrency_id="device",
            concurrency_limit=1,
        )

    return run, wire
