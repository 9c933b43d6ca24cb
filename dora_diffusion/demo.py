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
JUDGED_STEPS = 20  # Euler steps of the judged images (the grid shows some of them): `make demo` within 5 minutes
JUDGED_BATCH = 32  # images per pipeline call: 64 images in 14-16 s against 18 s in batches of 16 (2 threads)
GRID_SEEDS = 2  # the grid shows the judged images of seeds 0 and 1
NUM_CLASS_IMAGES = 50
# Min-SNR-γ weighting (the sweep trains with it too). The model was pretrained with γ = 5; for the adapters γ = 2
# drew the subject more often (benchmarks/results/demo-recipe.json: DoRA 44% -> 53% on the photos as they are).
SNR_GAMMA = 2.0
BATCH_SIZE = 4  # instance images per step (and as many class images): 66% -> 84% for DoRA, 59% -> 81% for LoRA
FRAMING = 0.7  # the robot's share of the training crops' height, as the world frames its robots
# The first recipe on the pretrained model (with the photos as they are): what benchmarks/demo_recipe.py's variants
# change and benchmarks/subject_style.py trains, so their stored figures keep their meaning.
FIRST_RECIPE = {"snr_gamma": 5.0, "batch_size": 1}
CELL = 160  # grid cell size: the 64 px images enlarged (nearest neighbour)


def demo_config(output: Path, method: str, steps: int, data: Path | None = None):
    """The demo's recipe for ``method``; ``data``: its training pictures (default: ``framed_photos``'s folder
    under ``output``, which ``run_demo`` writes first)."""
    from .config import TrainConfig

    return TrainConfig(
        data=str(data or output / "photos"),
        prompt=PROMPT,
        output=str(output / method),
        method=method,
        rank=8,
        targets="attn+ff",
        learning_rate=3e-3,
        max_steps=steps,
        # Min-SNR weighting (γ = 5) nearly doubled the first recipe's subject rate (DoRA 25% -> 44%, LoRA 25% ->
        # 41% of 32 seeds; benchmarks/results/demo-recipe.json); γ = 2 more.
        snr_gamma=SNR_GAMMA,
        batch_size=BATCH_SIZE,
        seed=0,
        class_prompt=CLASS_PROMPT,
        class_data=str(output / "class_images"),
        num_class_images=NUM_CLASS_IMAGES,
        sample_batch_size=10,  # 50 class images: 87 s one by one on the tiny model, 27 s in batches of 10
        validation_steps=0,
        num_validation_images=2,
        validation_inference_steps=25,
        checkpoint_steps=0,
        report_to="tensorboard",
        log_every=1,
    )


def framed_photos(out: Path, folder: Path = SAMPLE_DATA, fraction: float = FRAMING) -> Path:
    """The sample photos cropped square around the robot so that it fills ``fraction`` of the crop's height,
    as the world frames its robots, written to ``out`` with their caption sidecars. In most of the photos the
    robot is small (a quarter to a half of the height): at the model's 64 px its heart is a few pixels, and
    trained on the photos as they are, the adapters drew it about half as often (demo-recipe.json). The robot
    is found by its teal colour, its antenna and feet as 30% above the teal parts' extent; a photo in which
    it already fills that much (the close-up) is centre-cropped as it is. Nothing here reads the judge."""
    import numpy as np
    from PIL import Image

    from .config import ConfigError

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.suffix == ".txt":
            shutil.copy(path, out / path.name)  # the caption sidecar
            continue
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        im = Image.open(path).convert("RGB")
        a = np.asarray(im).astype(int)
        r, g, b = a[..., 0], a[..., 1], a[..., 2]
        teal = (g > 110) & (b > 100) & (r < 110) & (g - r > 50) & (b < g + 5) & (b > 0.75 * g)
        ys, xs = np.nonzero(teal)
        if len(ys) < 100:
            raise ConfigError(f"data: {path} shows no teal robot to frame (framed_photos is for the sample subject)")
        y0, y1 = np.percentile(ys, [2, 98])
        x0, x1 = np.percentile(xs, [2, 98])
        side = min(max(1.3 * (y1 - y0), x1 - x0) / fraction, min(im.size))
        left = int(np.clip((x0 + x1 - side) / 2, 0, im.width - side))
        top = int(np.clip((y0 + y1 - side) / 2, 0, im.height - side))
        im.crop((left, top, left + int(side), top + int(side))).save(out / f"{path.stem}.png")
    return out


def subject_photos() -> list:
    """The sample subject's photos, centre-cropped square (what the judge and the metrics compare with)."""
    from PIL import Image

    from .evaluation import square

    return [square(Image.open(p)) for p in sorted(SAMPLE_DATA.glob("*.jpg"))]


class Judging:
    """The demo's judging, one model at a time (None = the base, judged first): over ``seeds``, how often the
    judge sees the subject for the instance prompt and keeps the scene of the scene prompts; subject fidelity
    of the instance images against the subject's photos and drift of the class prompt's images from the base
    model's (judge embeddings). ``samples[label][prompt]`` keeps the images the judge saw."""

    def __init__(self, pipe, judge, seeds: range):
        from .metrics import JudgeEmbedder

        self.pipe, self.judge, self.seeds = pipe, judge, seeds
        self.embedder = JudgeEmbedder(judge)
        self.reference = self.embedder.embed_images(subject_photos())
        self.base_class = None
        self.rows: dict[str, dict[str, Any]] = {}
        self.samples: dict[str, dict[str, list]] = {}

    def model(self, label: str, adapter: Path | None) -> dict[str, Any]:
        from dataclasses import asdict

        import torch

        from .formats import load_adapter, unload_adapter
        from .metrics import Score, drift, subject_fidelity
        from .world.evaluate import subject_presence

        pipe, judge, seeds = self.pipe, self.judge, self.seeds
        gen = {"steps": JUDGED_STEPS, "batch": JUDGED_BATCH}
        unload_adapter(pipe)
        if adapter is not None:
            load_adapter(pipe, adapter)
        row: dict[str, Any] = {}
        seen = self.samples.setdefault(label, {})
        row["instance"], seen[PROMPT] = subject_presence(pipe, judge, PROMPT, seeds, **gen)
        row["subject_fidelity"] = asdict(subject_fidelity(self.embedder.embed_images(seen[PROMPT]), self.reference))
        if adapter is not None:  # the base model is not asked for the scenes: no claim is made about it
            kept: list[float] = []  # prompt fidelity: the scenes kept, pooled over the scene prompts
            for prompt, scene in SCENE_PROMPTS.items():
                row[scene], seen[prompt] = subject_presence(pipe, judge, prompt, seeds, scene=scene, **gen)
                kept += [float(r["scene"] == scene) for r in judge.read(seen[prompt])]
            row["prompt_fidelity"] = asdict(Score.of(torch.tensor(kept)))
        row["class"], seen[CLASS_PROMPT] = subject_presence(pipe, judge, CLASS_PROMPT, seeds, **gen)
        class_emb = self.embedder.embed_images(seen[CLASS_PROMPT])
        if adapter is None:
            self.base_class = class_emb
        if self.base_class is not None:
            row["class_drift"] = asdict(drift(self.base_class, class_emb))
        unload_adapter(pipe)
        self.rows[label] = row
        return row


def run_demo(
    output: Path = Path("outputs/demo"), steps: int | None = None, overwrite: bool = False, threads: int | None = None
) -> dict:
    """Train both methods, write ``comparison.png`` and ``summary.json`` under ``output``; return the summary."""
    from .config import ConfigError
    from .models import embedded_judge, embedded_model, load_pipeline, native_resolution
    from .sampling import image_grid
    from .threads import generation_threads, set_torch_threads
    from .validation import generate_class_images
    from .world.evaluate import generate_batch

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
    train_threads = set_torch_threads(threads, model=None)  # one on the tiny model, unless --threads / OMP say
    # Decided once, now, while the machine is as the user left it: after our own training the load average
    # would count the demo itself as the "other process" and halve the judging's threads.
    gen_threads, why = generation_threads(threads)
    model = embedded_model()
    print(f"embedded tiny SDXL (pretrained on the toy world): {model}")
    steps = steps or DEMO_STEPS
    framed_photos(output / "photos")
    configs = {method: demo_config(output, method, steps) for method in ("lora", "dora")}

    import torch

    torch.set_num_threads(gen_threads)
    print(f"generating with {gen_threads} torch thread(s) ({why})")
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    # The class images first, once, for both runs (a run finds them on disk and generates none).
    cfg = configs["lora"]
    generate_class_images(pipe, Path(cfg.class_data), CLASS_PROMPT, cfg.num_class_images, native_resolution(model), cfg)
    judging = Judging(pipe, embedded_judge(), range(JUDGED_SEEDS))
    judge_seconds = 0.0

    def judge_base(threads: int) -> None:
        nonlocal judge_seconds
        torch.set_num_threads(threads)
        t = time.perf_counter()
        judging.model("base", None)
        judge_seconds += time.perf_counter() - t

    side_by_side = gen_threads >= 2 * train_threads
    if side_by_side:
        # A core each: the two runs take one run's time (both share the machine alike, so the step-time
        # ratio stays a fair one), and the core the faster run frees judges the base model meanwhile.
        print(f"training lora and dora side by side, {train_threads} thread(s) each; logs in {output}/*.log")
        results = train_side_by_side(configs, output, train_threads, on_first_done=lambda: judge_base(train_threads))
    else:
        results = {m: _train_one(c, None, train_threads) for m, c in configs.items()}
    for method, r in results.items():
        print(f"  {method}: {r['train_seconds']:.0f} s, median step {r['median_step_ms']:.0f} ms")

    # The judged images (seeds 0..31 of each prompt); the grid shows those of seeds 0 and 1, the same initial
    # noise for base, LoRA and DoRA in each row.
    torch.set_num_threads(gen_threads)
    columns = {"base": None, "LoRA": output / "lora", "DoRA": output / "dora"}
    if "base" not in judging.rows:
        judge_base(gen_threads)
    t = time.perf_counter()
    for label in ("LoRA", "DoRA"):
        judging.model(label, columns[label])
    judge_seconds += time.perf_counter() - t
    judged, samples = {label: judging.rows[label] for label in columns}, judging.samples
    grid_seeds = range(min(GRID_SEEDS, JUDGED_SEEDS))
    for prompt in SCENE_PROMPTS:  # the base model is not judged on the scenes; the grid shows it all the same
        samples["base"][prompt] = generate_batch(pipe, [prompt] * len(grid_seeds), grid_seeds, steps=JUDGED_STEPS)
    rows = [[_side_by_side(samples[c][p][: len(grid_seeds)], CELL) for c in columns] for p in GRID_PROMPTS]
    seeds_label = ", ".join(str(s) for s in grid_seeds)
    grid = image_grid(rows, col_labels=[f"{c} (seeds {seeds_label})" for c in columns], row_labels=list(GRID_PROMPTS))
    grid_path = output / "comparison.png"
    grid.save(grid_path)

    summary = {
        "model": _shown(model),
        "steps": steps,
        "seed": 0,
        "grid": str(grid_path),
        "methods": results,
        "dora_over_lora_step_time": results["dora"]["median_step_ms"] / results["lora"]["median_step_ms"],
        "trained": "side by side, a core each" if side_by_side else "one after the other",
        "judged": judged,
        "judged_steps": JUDGED_STEPS,
        "generation_threads": gen_threads,
        "judge_seconds": judge_seconds,
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


def _shown(path) -> str:
    """``path`` relative to the working directory when it is under it (a summary that names no home folder)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _train_one(config, log: Path | None, threads: int) -> dict:
    """Train one method; its output goes to ``log`` when given (a run beside another would interleave)."""
    import contextlib

    import torch

    from .train import train

    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        if log is not None:
            f = stack.enter_context(open(log, "w", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        t = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - t
    return {
        "adapter": str(result.adapter_file),
        "final_loss": result.final_loss,
        "median_step_ms": result.median_step_seconds * 1000,
        "train_seconds": seconds,
        "trainable_parameters": result.trainable_parameters,
    }


def train_side_by_side(configs: dict, output: Path, threads: int, on_first_done=None) -> dict[str, dict]:
    """Each config trained in a process of its own at the same time (spawned: no forked torch state);
    ``on_first_done()`` runs here as soon as the first run ends (while the others go on)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    output.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(configs), mp_context=ctx) as pool:
        futures = {m: pool.submit(_train_one, c, output / f"{m}.log", threads) for m, c in configs.items()}
        done, _ = wait(futures.values(), return_when=FIRST_COMPLETED)
        if on_first_done is not None and not any(f.exception() for f in done):
            on_first_done()
        results = {}
        for method, future in futures.items():
            try:
                results[method] = future.result()
            except Exception as e:
                raise RuntimeError(f"training {method} failed ({e}); its log: {output / f'{method}.log'}") from e
    return results


def _side_by_side(images, cell: int):
    from PIL import Image

    strip = Image.new("RGB", (cell * len(images), cell), "white")
    for i, im in enumerate(images):
        strip.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (i * cell, 0))
    return strip
