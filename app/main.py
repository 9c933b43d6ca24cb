"""The Gradio app: Compare, Train, Export, Analysis (a ``ui_*`` module each). UI only; every action is one
call on ``dora_diffusion.engine.Engine``.

    dora-diffusion app [--model DIR] [--outputs outputs] [--host 127.0.0.1] [--port 7860] [--share]
    python app/main.py ...   (the same)

``build_app(engine)`` returns the ``gr.Blocks``; ``serve(engine, ...)`` launches it. Nothing is loaded at
import: the engine loads the model on the first generation.
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
if str(Path(__file__).resolve().parent) not in sys.path:  # app/ is not a package: its tabs by module name
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradio as gr
from ui_analysis import analysis_tab
from ui_compare import compare_tab
from ui_export import FORMATS, USAGE, export_tab
from ui_shared import GRADIO_TMP, run_choices, shown, shown_path
from ui_train import loss_figure, receive_uploads, train_tab

from dora_diffusion.engine import Engine

__all__ = [
    "CSS",
    "FORMATS",
    "GRADIO_TMP",
    "THEME",
    "USAGE",
    "build_app",
    "loss_figure",
    "receive_uploads",
    "serve",
    "shown",
]

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate")
CSS = """
.gradio-container { max-width: 1360px !important; }
#header h1 { margin-bottom: 0; }
#header p { margin-top: 2px; color: var(--body-text-color-subdued); }
#status { min-height: 1.6em; }
/* the embedded model draws 64 px images: fill the box, keep the pixels sharp (display only) */
#compare-base img, #compare-lora img, #compare-dora img { width: 100%; height: 100%; object-fit: contain;
  image-rendering: pixelated; }
.dd-progress { padding: 10px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px; }
.dd-bar { height: 8px; margin-top: 8px; border-radius: 4px; background: var(--neutral-200); overflow: hidden; }
.dd-bar > div { height: 100%; background: var(--primary-500); transition: width 0.5s; }
.dd-progress .dd-note { color: var(--body-text-color-subdued); font-size: 0.9em; margin-top: 4px; }
#scan textarea { font-family: var(--font-mono); font-size: 0.85em; }
"""


def build_app(engine: Engine) -> gr.Blocks:
    """The four tabs over ``engine``; call ``serve`` (or ``.launch()``) to start it."""
    size = engine.native_size()
    lora_default, dora_default = engine.default_runs()
    choices = run_choices(engine)
    # Read by every component as it is made, and by the server at launch; files older than a day go.
    os.environ["GRADIO_TEMP_DIR"] = str(engine.workspace / GRADIO_TMP)

    with gr.Blocks(title="dora-diffusion", delete_cache=(86400, 86400)) as app:
        gr.Markdown(
            f"# dora-diffusion\nDoRA and LoRA side by side on SDXL · model: **{html.escape(engine.model_label)}** · "
            f"workspace: `{shown_path(engine.workspace)}` · device: {engine.device}",
            elem_id="header",
        )
        with gr.Tabs():
            lora, dora, refresh, wire_compare = compare_tab(engine, size, choices, lora_default, dora_default)
            wire_train = train_tab(engine, size, app)
            run, wire_export = export_tab(engine, choices, lora_default, dora_default)
            analysis_runs, wire_analysis = analysis_tab(engine, choices, lora_default, dora_default)

        # ------------------------------------------------------------------------------- events
        pickers = [lora, dora, run, analysis_runs]

        def refresh_runs():
            new = run_choices(engine)
            return [gr.Dropdown(choices=new) for _ in pickers]

        refresh.click(shown(refresh_runs), None, pickers, api_name="runs", queue=False)
        wire_compare()
        wire_train(pickers)
        wire_export()
        wire_analysis()
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    threads: int | None = None,
    **launch_kwargs,
):
    """Build and launch the app. Only the exports folder is served as files (for downloads).
    ``threads``: torch's CPU threads (``dora_diffusion.threads.choose_threads`` picks when None)."""
    from dora_diffusion.threads import set_torch_threads

    set_torch_threads(threads, model=engine.model)
    engine.exports_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(engine)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        theme=THEME,
        css=CSS,
        allowed_paths=[str(engine.exports_dir)],
        max_file_size=f"{engine.limits.max_upload_mb}mb",
        footer_links=[],
        **launch_kwargs,
    )
    return app


if __name__ == "__main__":
    from dora_diffusion.cli import main

    sys.exit(main(["app", *sys.argv[1:]]))
