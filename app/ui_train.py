"""The Train tab: subject images, a run's options, its progress, loss and validation images."""

from __future__ import annotations

import contextlib
import html
from pathlib import Path

import gradio as gr
from ui_shared import GRADIO_TMP, open_image, run_choices, shown

from dora_diffusion.engine import Engine, TrainProgress, TrainRequest


def progress_html(p: TrainProgress) -> str:
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


def train_tab(engine: Engine, size: int, app: gr.Blocks):
    """The tab's components; returns ``wire(pickers)``, its events (a finished run refreshes ``pickers``)."""
    L = engine.limits
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
                instance = gr.Textbox("a photo of sks toy", label="Instance prompt", info="a rare token + the class")
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
                        resolution = gr.Slider(L.min_size, L.max_size, size, step=L.size_multiple, label="Resolution")
                    with gr.Row():
                        val_every = gr.Number(0, label="Validation every N steps (0: 4 times)", precision=0, minimum=0)
                        batch = gr.Slider(1, L.max_batch_size, TrainRequest.batch_size, step=1, label="Batch size")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="start")
                    cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
            with gr.Column(scale=3):
                progress = gr.HTML(progress_html(engine.training_progress()), elem_id="progress")
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

    def wire(pickers: list) -> None:
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
                loaded = [(open_image(path), caption) for path, caption in reversed(p.validation)]
                if all(image is not None for image, _ in loaded):  # else one is being written: next tick
                    new_images, count = loaded, len(loaded)
            done = (
                [gr.Dropdown(choices=run_choices(engine)) for _ in pickers]
                if not running
                else [gr.skip()] * len(pickers)
            )
            plot = loss_figure(p) if len(p.losses) != plotted_count else gr.skip()
            return (
                progress_html(p),
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

    return wire
