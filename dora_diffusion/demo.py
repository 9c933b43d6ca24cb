"""``make demo``: LoRA and DoRA trained on the sample subject with the same seed, side by side, judged.

Runs on the embedded tiny SDXL, pretrained on the toy world (``dora_diffusion.world``): it draws toys
from prompts but has never seen the sample subject (a teal robot with a red heart). DreamBooth with
prior preservation (class images of "a photo of a toy" from the base model) teaches it "sks toy";
the grid shows base | LoRA | DoRA from the same noise, and the world's judge counts in how many of
32 seeds each model draws the subject, and keeps the scene asked for.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "datasets" / "sks_toy"
PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"
GRID_PROMPTS = ("a photo of sks toy", "sks toy on the grass", "sks toy on the beach", CLASS_PROMPT)
SCENE_PROMPTS = {"sks toy on the grass": "grass", "sks toy on the beach": "beach"}
DEMO_STEPS = 400
JUDGED_SEEDS = 32
JUDGED_STEPS = 20  # Euler steps of the judged images (the grid's have 25): keeps `make demo` within 5 minutes
NUM_CLASS_IMAGES = 50
CELL = 160  # grid cell size: the 64 px images enlarged (nearest neighbour)


def demo_config(output: Path, method: str, steps: int):
    from .config import TrainConfig

    return TrainConfig(
        data=str(SAMPLE_DATA),
        prompt=PROMPT,
        output=str(output / method),
        method=method,
        rank=8,
        targets="attn+ff",
        learning_rate=3e-3,
        max_steps=steps,
        # Min-SNR-5 weighting, as the embedded model was pretrained: it roughly doubled the subject rate
        # (DoRA 22% -> 44%, LoRA -> 47% of 32 seeds; README, "The demo's recipe").
        snr_gamma=5.0,
        seed=0,
        class_prompt=CLASS_PROMPT,
        class_data=str(output / "class_images"),
        num_class_images=NUM_CLASS_IMAGES,
        validation_steps=0,
        num_validation_images=2,
        validation_inference_steps=25,
        checkpoint_steps=0,
        report_to="tensorboard",
        log_every=1,
    )


def subject_photos() -> list:
    """The sample subject's photos, centre-cropped square (what the judge and the metrics compare with)."""
    from PIL import Image

    from .evaluation import square

    return [square(Image.open(p)) for p in sorted(SAMPLE_DATA.glob("*.jpg"))]


def judge_models(pipe, judge, adapters: dict[str, Path | None], seeds: range) -> dict[str, dict[str, Any]]:
    """Per model (None = the base), over ``seeds``: how often the judge sees the subject for the instance
    prompt and keeps the scene of the scene prompts; subject fidelity of the instance images against the
    subject's photos and drift of the class prompt's images from the base model's (judge embeddings)."""
    from dataclasses import asdict

    import torch

    from .formats import load_adapter, unload_adapter
    from .metrics import JudgeEmbedder, Score, drift, subject_fidelity
    from .world.evaluate import subject_presence

    embedder = JudgeEmbedder(judge)
    reference = embedder.embed_images(subject_photos())
    out: dict[str, dict[str, Any]] = {}
    base_class = None
    for label, adapter in adapters.items():
        unload_adapter(pipe)
        if adapter is not None:
            load_adapter(pipe, adapter)
        row: dict[str, Any] = {}
        row["instance"], images = subject_presence(pipe, judge, PROMPT, seeds, steps=JUDGED_STEPS)
        row["subject_fidelity"] = asdict(subject_fidelity(embedder.embed_images(images), reference))
        if adapter is not None:  # the base model is not asked for the scenes: no claim is made about it
            kept: list[float] = []  # prompt fidelity: the scenes kept, pooled over the scene prompts
            for prompt, scene in SCENE_PROMPTS.items():
                row[scene], images = subject_presence(pipe, judge, prompt, seeds, scene=scene, steps=JUDGED_STEPS)
                kept += [float(r["scene"] == scene) for r in judge.read(images)]
            row["prompt_fidelity"] = asdict(Score.of(torch.tensor(kept)))
        row["class"], class_images = subject_presence(pipe, judge, CLASS_PROMPT, seeds, steps=JUDGED_STEPS)
        class_emb = embedder.embed_images(class_images)
        base_class = class_emb if adapter is None else base_class
        if base_class is not None:
            row["class_drift"] = asdict(drift(base_class, class_emb))
        out[label] = row
    unload_adapter(pipe)
    return out


def run_demo(
    output: Path = Path("outputs/demo"), steps: int | None = None, overwrite: bool = False, threads: int | None = None
) -> dict:
    """Train both methods, write ``comparison.png`` and ``summary.json`` under ``output``; return the summary."""
    from .config import ConfigError
    from .models import embedded_judge, embedded_model, load_pipeline
    from .sampling import Column, SampleSettings, image_grid, sample_columns
    from .threads import generation_threads, set_torch_threads
    from .train import train

    if not SAMPLE_DATA.is_dir():
        raise ConfigError(
            f"data: the sample subject {SAMPLE_DATA} ships with the repository; run the demo from a checkout"
        )
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(f"output: {output} exists; pass --overwrite to replace the demo")
        shutil.rmtree(output)
    started = time.perf_counter()
    set_torch_threads(threads, model=None)  # one on the tiny model, unless --threads / OMP_NUM_THREADS say
    model = embedded_model()
    print(f"embedded tiny SDXL (pretrained on the toy world): {model}")
    steps = steps or DEMO_STEPS
    results = {}
    for method in ("lora", "dora"):
        t = time.perf_counter()
        result = train(demo_config(output, method, steps))
        results[method] = {
            "adapter": str(result.adapter_file),
            "final_loss": result.final_loss,
            "median_step_ms": result.median_step_seconds * 1000,
            "train_seconds": time.perf_counter() - t,
            "trainable_parameters": result.trainable_parameters,
        }

    # The grid: the same initial noise for base, LoRA and DoRA in each row.
    import torch

    gen_threads, why = generation_threads(threads)
    torch.set_num_threads(gen_threads)
    print(f"generating with {gen_threads} torch thread(s) ({why})")
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    columns = {"base": None, "LoRA": output / "lora", "DoRA": output / "dora"}
    settings = [SampleSettings(prompt, seed=0, steps=25, guidance=5.0) for prompt in GRID_PROMPTS]
    sampled = sample_columns(pipe, [Column(label, adapter) for label, adapter in columns.items()], settings, 2)
    rows = [[_side_by_side(col.images[r], CELL) for col in sampled] for r in range(len(GRID_PROMPTS))]
    grid = image_grid(rows, col_labels=[f"{c} (seeds 0, 1)" for c in columns], row_labels=list(GRID_PROMPTS))
    grid_path = output / "comparison.png"
    grid.save(grid_path)

    t = time.perf_counter()
    judged = judge_models(pipe, embedded_judge(), columns, range(JUDGED_SEEDS))
    summary = {
        "model": str(model),
        "steps": steps,
        "seed": 0,
        "grid": str(grid_path),
        "methods": results,
        "dora_over_lora_step_time": results["dora"]["median_step_ms"] / results["lora"]["median_step_ms"],
        "judged": judged,
        "judged_steps": JUDGED_STEPS,
        "generation_threads": gen_threads,
        "judge_seconds": time.perf_counter() - t,
        "wall_seconds": time.perf_counter() - started,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndemo done in {summary['wall_seconds']:.0f} s")
    for method, r in results.items():
        print(
            f"  {method}: final loss {r['final_loss']:.4f}, median step {r['median_step_ms']:.0f} ms -> {r['adapter']}"
        )
    print(f"  judged over {JUDGED_SEEDS} seeds (the world's judge): the subject (teal robot with a heart) drawn for")
    for label, row in judged.items():
        scenes = "".join(
            f"  {prompt!r}: subject {row[scene]['subject']:.0%}, {scene} {row[scene]['scene']:.0%};"
            for prompt, scene in SCENE_PROMPTS.items()
            if scene in row
        )
        print(
            f"    {label:5s} {PROMPT!r}: {row['instance']['subject']:.0%};{scenes}"
            f"  {CLASS_PROMPT!r}: subject {row['class']['subject']:.0%}"
        )
    from .metrics import Score, ahead

    fid = {k: Score(**judged[k]["subject_fidelity"]) for k in ("LoRA", "DoRA")}
    dr = {k: Score(**judged[k]["class_drift"]) for k in ("LoRA", "DoRA")}
    summary["subject_fidelity_verdict"] = ahead(fid["DoRA"], fid["LoRA"], names=("DoRA", "LoRA"))
    summary["class_drift_verdict"] = ahead(dr["DoRA"], dr["LoRA"], names=("DoRA", "LoRA"), lower_is_better=True)
    pf = {k: Score(**judged[k]["prompt_fidelity"]) for k in ("LoRA", "DoRA")}
    summary["prompt_fidelity_verdict"] = ahead(pf["DoRA"], pf["LoRA"], names=("DoRA", "LoRA"))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"  subject fidelity (judge embedding, vs the photos): LoRA {fid['LoRA'].mean:.3f} ± {fid['LoRA'].std:.3f}, "
        f"DoRA {fid['DoRA'].mean:.3f} ± {fid['DoRA'].std:.3f}: {summary['subject_fidelity_verdict']}"
    )
    print(
        f"  drift of {CLASS_PROMPT!r} from the base: LoRA {dr['LoRA'].mean:.3f}, DoRA {dr['DoRA'].mean:.3f}: "
        f"{summary['class_drift_verdict']}"
    )
    print(
        f"  scenes kept (grass, beach pooled): LoRA {pf['LoRA'].mean:.0%}, DoRA {pf['DoRA'].mean:.0%}: "
        f"{summary['prompt_fidelity_verdict']}"
    )
    print(f"  side by side (base | LoRA | DoRA, same seeds): {grid_path}")
    print("  look at them in the app: make app   (or: dora-diffusion app)")
    return summary


def _side_by_side(images, cell: int):
    from PIL import Image

    strip = Image.new("RGB", (cell * len(images), cell), "white")
    for i, im in enumerate(images):
        strip.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (i * cell, 0))
    return strip
