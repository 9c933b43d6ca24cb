"""The Gradio app: Compare, Train, Export. UI only; every action is one call on ``dora_diffusion.engine.Engine``.

    dora-diffusion app [--model DIR] [--outputs outputs] [--host 127.0.0.1] [--port 7860] [--share]
    python app/main.py ...   (the same)

``build_app(engine)`` returns the ``gr.Blocks``; ``serve(engine, ...)`` launches it. Nothing is loaded at
import: the engine loads the model on the first generation.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool

import gradio as gr
from PIL import Image

from dora_diffusion.engine import EXPORT_DTYPES, Engine, TrainProgress, TrainRequest, is_user_error, user_message

log = logging.getLogger("dora_diffusion.app")

GRADIO_TMP = ".gradio-tmp"
"""Gradio's own files (uploads as received, generated images, downloads), in the workspace."""

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

NONE = ("none", "")
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


def shown(fn):
    """Errors become a message in the UI (``gr.Error``), never a traceback; unexpected ones are logged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            if not is_user_error(e):  # an internal error: its traceback goes to the server log
                log.exception("%s failed", fn.__name__)
            raise gr.Error(html.escape(user_message(e), quote=False), print_exception=False) from None

    return wrapper


def _run_choices(engine: Engine) -> list[tuple[str, str]]:
    return [NONE] + [(r.label, r.name) for r in engine.list_runs()]


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (as the user typed it)."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _progress_html(p: TrainProgress) -> str:
    if p.state == "idle":
        return f"<div class='dd-progress'>{html.escape(p.message)}</div>"
    head = html.escape(p.message)
    facts = []
    if p.loss is not None:
        facts.append(f"loss {p.loss:.4f}")
    if p.its:
        facts.append(f"{p.its:.2f} it/s")
    if p.state == "running" and p.eta_seconds is not None:
        facts.append(
            f"about {p.eta_seconds / 60:.0f} min left" if p.eta_seconds >= 90 else f"about {p.eta_seconds:.0f} s left"
        )
    percent = 100 * p.step / max(p.max_steps, 1)
    bar = f"<div class='dd-bar'><div style='width:{percent:.1f}%'></div></div>" if p.state == "running" else ""
    note = f"<div class='dd-note'>{' · '.join(facts)}</div>" if facts else ""
    state = p.state.capitalize()
    head = f"<b>{state}</b> · {head}" if not p.message.startswith(state) else f"<b>{head}</b>"
    return f"<div class='dd-progress'>{head}{bar}{note}</div>"


def _open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:  # half-written by the training thread
        return None


# Same seed, same data order: LoRA's and DoRA's losses may coincide. A wide translucent solid line under a
# thin dashed one with dots shows both (the native line plot tells series apart by colour only).
LOSS_STYLE = {
    "LoRA": dict(color="#6366f1", linestyle="-", linewidth=3.5, alpha=0.6, zorder=2),
    "DoRA": dict(color="#f97316", linestyle="--", linewidth=1.5, marker="o", markersize=3, zorder=3),
}


def loss_figure(p: TrainProgress):
    """The training loss per method (``None`` before the first logged step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not p.losses:
        return None
    names = {"lora": "LoRA", "dora": "DoRA"}
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in dict.fromkeys(m for m, _, _ in p.losses):
        points = [(step, loss) for m, step, loss in p.losses if m == method]
        name = names.get(method, method)
        ax.plot([s for s, _ in points], [loss for _, loss in points], label=name, **LOSS_STYLE.get(name, {}))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(title="method", loc="upper right", fontsize=8, title_fontsize=8)
    return fig


def receive_uploads(engine: Engine, files, resolution: int) -> tuple[str, str]:
    """Save uploaded files in the workspace (``Engine.save_uploads``), then delete Gradio's copies of them,
    saved or refused: they are no longer needed. Files outside Gradio's folder are never touched."""
    tmp = (engine.workspace / GRADIO_TMP).resolve()
    try:
        folder, summary = engine.save_uploads(files or [], resolution)
    finally:
        for f in files or []:
            path = Path(f).resolve()
            if tmp in path.parents:
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # Gradio gives every upload a folder of its own
    return engine.relative(folder), summary


def build_app(engine: Engine) -> gr.Blocks:
    """The three tabs over ``engine``; call ``serve`` (or ``.launch()``) to start it."""
    L = engine.limits
    size = engine.native_size()
    lora_default, dora_default = engine.default_runs()
    choices = _run_choices(engine)
    # Read by every component as it is made, and by the server at launch; files older than a day go.
    os.environ["GRADIO_TEMP_DIR"] = str(engine.workspace / GRADIO_TMP)

    with gr.Blocks(title="dora-diffusion", delete_cache=(86400, 86400)) as app:
        gr.Markdown(
            f"# dora-diffusion\nDoRA and LoRA side by side on SDXL · model: **{html.escape(engine.model_label)}** · "
            f"workspace: `{_shown_path(engine.workspace)}` · device: {engine.device}",
            elem_id="header",
        )
        with gr.Tabs():
            # ---------------------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        prompt = gr.Textbox(
                            "a photo of sks toy", label="Prompt", lines=2, max_length=L.max_prompt_chars
                        )
                        negative = gr.Textbox("", label="Negative prompt", max_length=L.max_prompt_chars)
                        with gr.Row(equal_height=True):
                            seed = gr.Number(
                                0,
                                label="Seed",
                                info="the same noise for all three",
                                precision=0,
                                minimum=0,
                                maximum=2**32 - 1,
                                scale=3,
                            )
                            dice = gr.Button("Random seed", size="sm", scale=1, min_width=100)
                        steps = gr.Slider(1, L.max_sample_steps, 25, step=1, label="Steps")
                        guidance = gr.Slider(0, L.max_guidance, 5.0, step=0.5, label="Guidance")
                        width = gr.Slider(
                            L.min_size, L.max_size, size, step=L.size_multiple, label="Width", elem_id="width"
                        )
                        height = gr.Slider(
                            L.min_size, L.max_size, size, step=L.size_multiple, label="Height", elem_id="height"
                        )
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=5):
                        with gr.Row(equal_height=True):
                            images = [
                                gr.Image(
                                    label=label,
                                    type="pil",
                                    format="png",
                                    interactive=False,
                                    height=360,
                                    elem_id=f"compare-{key}",
                                    buttons=["download", "fullscreen"],
                                )
                                for key, label in (("base", "Base"), ("lora", "LoRA"), ("dora", "DoRA"))
                            ]
                        with gr.Row():
                            with gr.Column(min_width=160):
                                gr.Markdown(
                                    "**Base model**, no adapter.\n\nAdapters are swapped into this one "
                                    "pipeline; it is loaded once."
                                )
                            with gr.Column(min_width=160):
                                lora = gr.Dropdown(
                                    choices,
                                    value=lora_default or "",
                                    label="LoRA adapter",
                                    info="a run, or a path in the workspace",
                                    allow_custom_value=True,
                                )
                                lora_scale = gr.Slider(0, L.max_adapter_scale, 1.0, step=0.05, label="LoRA scale")
                            with gr.Column(min_width=160):
                                dora = gr.Dropdown(
                                    choices,
                                    value=dora_default or "",
                                    label="DoRA adapter",
                                    info="a run, or a path in the workspace",
                                    allow_custom_value=True,
                                )
                                dora_scale = gr.Slider(0, L.max_adapter_scale, 1.0, step=0.05, label="DoRA scale")
                        with gr.Row():
                            status = gr.Markdown("", elem_id="status")
                            refresh = gr.Button("↻ Refresh runs", size="sm", scale=0, min_width=140)
                        with gr.Row(equal_height=True):
                            measure_seeds = gr.Number(
                                8, label="Seeds to measure", precision=0, minimum=2, maximum=64, scale=1, min_width=120
                            )
                            measure_class = gr.Textbox("a photo of a toy", label="Class prompt (drift)", scale=3)
                            measure = gr.Button("Measure", size="sm", scale=1, min_width=120, elem_id="measure")
                        scores = gr.Markdown(
                            "**Measure** scores base, LoRA and DoRA on that many seeds of the prompt: subject "
                            "fidelity against the run's photos, how often the subject is drawn (embedded model), "
                            "and drift of the class prompt from the base; and says which adapter is ahead.",
                            elem_id="scores",
                        )

            # ------------------------------------------------------------------------------ Train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=340):
                        gr.Markdown("**1 · Subject images**: upload 5-20 photos, or name a folder in the workspace.")
                        uploads = gr.File(
                            label="Upload images (and optional .txt captions)",
                            file_count="multiple",
                            file_types=["image", ".txt"],
                            height=120,
                        )
                        with gr.Row(equal_height=True):
                            data = gr.Textbox(label="Images folder (in the workspace)", scale=3)
                            check = gr.Button("Check folder", size="sm", scale=1, min_width=100)
                        sample = gr.Button("Use the sample subject (sks toy)", size="sm")
                        scan = gr.Textbox(
                            label="What training will use", lines=5, max_lines=12, interactive=False, elem_id="scan"
                        )
                        gr.Markdown("**2 · Run**")
                        instance = gr.Textbox(
                            "a photo of sks toy", label="Instance prompt", info="a rare token + the class"
                        )
                        run_name = gr.Textbox("", label="Run name", placeholder="default: from the prompt and the time")
                        method = gr.Radio(
                            [("LoRA", "lora"), ("DoRA", "dora"), ("Both (same seed)", "both")],
                            value="both",
                            label="Method",
                        )
                        rank = gr.Slider(1, L.max_rank, TrainRequest.rank, step=1, label="Rank")
                        with gr.Row():
                            train_steps = gr.Number(
                                TrainRequest.steps,
                                label="Steps",
                                precision=0,
                                minimum=1,
                                maximum=L.max_train_steps,
                                elem_id="train-steps",
                            )
                            lr = gr.Number(
                                TrainRequest.learning_rate,
                                label="Learning rate",
                                minimum=0,
                                maximum=L.max_learning_rate,
                            )
                        with gr.Accordion("More options", open=False):
                            with gr.Row():
                                train_seed = gr.Number(TrainRequest.seed, label="Seed", precision=0, minimum=0)
                                resolution = gr.Slider(
                                    L.min_size, L.max_size, size, step=L.size_multiple, label="Resolution"
                                )
                            with gr.Row():
                                val_every = gr.Number(
                                    0, label="Validation every N steps (0: 4 times)", precision=0, minimum=0
                                )
                                batch = gr.Slider(
                                    1, L.max_batch_size, TrainRequest.batch_size, step=1, label="Batch size"
                                )
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="start")
                            cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
                    with gr.Column(scale=3):
                        progress = gr.HTML(_progress_html(engine.training_progress()), elem_id="progress")
                        loss_plot = gr.Plot(label="Training loss", format="png")
                        gallery = gr.Gallery(
                            label="Validation images (fixed seeds, newest first)",
                            columns=4,
                            height=340,
                            object_fit="contain",
                            interactive=False,
                        )
                timer = gr.Timer(1.0, active=False)
                seen = gr.State(-1)
                plotted = gr.State(-1)  # loss points in the plot shown: drawn again only when there are more

            # ----------------------------------------------------------------------------- Export
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

            # --------------------------------------------------------------------------- Analysis
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

        # ------------------------------------------------------------------------------- events
        pickers = [lora, dora, run, analysis_runs]

        def refresh_runs():
            new = _run_choices(engine)
            return [gr.Dropdown(choices=new) for _ in pickers]

        refresh.click(shown(refresh_runs), None, pickers, api_name="runs", queue=False)

        dice.click(lambda: random.randrange(2**32), None, seed, api_visibility="private", queue=False)

        @shown
        def compare(prompt, negative, seed, steps, guidance, width, height, lora, lora_scale, dora, dora_scale):
            from dora_diffusion.sampling import SampleSettings

            settings = SampleSettings(
                prompt, negative or None, int(seed or 0), int(steps), float(guidance), int(width), int(height)
            )
            results = {
                g.label: g
                for g in engine.compare(
                    settings, lora or None, dora or None, lora_scale=float(lora_scale), dora_scale=float(dora_scale)
                )
            }
            out, titles = [], []
            for label in ("base", "LoRA", "DoRA"):
                g = results.get(label)
                title = "Base" if label == "base" else label if g else f"{label}: no adapter chosen"
                out.append(g.image if g else None)
                titles.append(f"{title} · {g.seconds:.2f} s" if g else title)
            note = (
                f"Seed {settings.seed} · {settings.steps} steps · guidance {settings.guidance:g} · "
                f"{settings.width}×{settings.height} · same initial noise in every column"
            )
            if settings.width < 256:
                note += " · shown enlarged"
            return *out, note, titles

        titles = gr.State([])  # image labels with their times; a State, so the API returns plain images
        generate.click(
            compare,
            [prompt, negative, seed, steps, guidance, width, height, lora, lora_scale, dora, dora_scale],
            [*images, status, titles],
            api_name="compare",
            concurrency_id="device",
            concurrency_limit=1,
        ).success(lambda t: [gr.Image(label=x) for x in t], titles, images, api_visibility="private", queue=False)

        @shown
        def measure_adapters(prompt, seed, steps, guidance, width, height, lora, dora, seeds, class_prompt):
            from dora_diffusion.sampling import SampleSettings

            settings = SampleSettings(
                prompt, None, int(seed or 0), int(steps), float(guidance), int(width), int(height)
            )
            return engine.score(
                settings,
                lora or None,
                dora or None,
                class_prompt=class_prompt or "a photo of a toy",
                eval_seeds=int(seeds or 8),
            )

        measure.click(
            measure_adapters,
            [prompt, seed, steps, guidance, width, height, lora, dora, measure_seeds, measure_class],
            scores,
            api_name="measure",
            concurrency_id="device",
            concurrency_limit=1,
        )

        @shown
        def save_uploads(files, resolution):
            folder, summary = receive_uploads(engine, files, int(resolution))
            return folder, summary, None  # the files are saved (or refused): the upload box is emptied

        @shown
        def use_sample(resolution):
            folder, summary = engine.use_sample_subject(int(resolution))
            return engine.relative(folder), summary, "a photo of sks toy"

        @shown
        def check_folder(folder, resolution):
            return engine.scan(folder, int(resolution)).summary()

        uploads.upload(save_uploads, [uploads, resolution], [data, scan, uploads], api_visibility="private")
        sample.click(use_sample, [resolution], [data, scan, instance], api_name="sample")
        check.click(check_folder, [data, resolution], scan, api_visibility="private")
        data.submit(check_folder, [data, resolution], scan, api_visibility="private")

        def poll(seen_count, plotted_count):
            p = engine.training_progress()
            running = p.state == "running"
            new_images, count = gr.skip(), seen_count
            if len(p.validation) != seen_count:  # loaded here: the workspace itself is not served
                loaded = [(_open_image(path), caption) for path, caption in reversed(p.validation)]
                if all(image is not None for image, _ in loaded):  # else one is being written: next tick
                    new_images, count = loaded, len(loaded)
            done = (
                [gr.Dropdown(choices=_run_choices(engine)) for _ in pickers]
                if not running
                else [gr.skip()] * len(pickers)
            )
            plot = loss_figure(p) if len(p.losses) != plotted_count else gr.skip()
            return (
                _progress_html(p),
                plot,
                new_images,
                count,
                len(p.losses),
                gr.Timer(active=running or count != len(p.validation)),
                gr.Button(interactive=not running),
                gr.Button(interactive=running),
                *done,
            )

        poll_outputs = [progress, loss_plot, gallery, seen, plotted, timer, start, cancel, *pickers]

        @shown
        def start_training(data, prompt, name, method, rank, steps, lr, seed, resolution, val_every, batch):
            engine.start_training(
                TrainRequest(
                    data=data,
                    prompt=prompt,
                    name=(name or "").strip(),
                    method=method,
                    rank=int(rank),
                    steps=int(steps or 0),
                    learning_rate=float(lr or 0),
                    seed=int(seed or 0),
                    resolution=int(resolution),
                    validation_steps=int(val_every) if val_every else None,
                    batch_size=int(batch),
                )
            )
            return poll(-1, -1)

        start.click(
            start_training,
            [data, instance, run_name, method, rank, train_steps, lr, train_seed, resolution, val_every, batch],
            poll_outputs,
            api_name="train",
            concurrency_id="device",
            concurrency_limit=1,
        )

        def cancel_training():
            if engine.cancel_training():
                gr.Info("Stopping after the current step; the run keeps a checkpoint.")

        cancel.click(cancel_training, None, None, api_name="cancel", queue=False)
        timer.tick(
            poll,
            [seen, plotted],
            poll_outputs,
            show_progress="hidden",
            api_visibility="private",
            concurrency_limit=None,
        )
        app.load(poll, [seen, plotted], poll_outputs, api_visibility="private")  # fresh run lists; a job already going

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

        @shown
        def do_analyze(runs):
            png, text = engine.analyze(runs or [])
            return _open_image(png), "```\n" + text + "\n```"

        analyze_btn.click(
            do_analyze,
            [analysis_runs],
            [analysis_plot, analysis_text],
            api_name="analyze",
            concurrency_id="device",
            concurrency_limit=1,
        )
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
