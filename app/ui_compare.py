"""The Compare tab: base, LoRA and DoRA from the same noise, and Measure."""

from __future__ import annotations

import random

import gradio as gr
from ui_shared import shown

from dora_diffusion.engine import Engine


def compare_tab(engine: Engine, size: int, choices, lora_default: str | None, dora_default: str | None):
    """The tab's components; returns its run pickers, its refresh button and ``wire()``, its events."""
    L = engine.limits
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox("a photo of sks toy", label="Prompt", lines=2, max_length=L.max_prompt_chars)
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
                width = gr.Slider(L.min_size, L.max_size, size, step=L.size_multiple, label="Width", elem_id="width")
                height = gr.Slider(L.min_size, L.max_size, size, step=L.size_multiple, label="Height", elem_id="height")
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

    def wire() -> None:
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

    return lora, dora, refresh, wire
