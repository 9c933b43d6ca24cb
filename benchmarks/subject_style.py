#!/usr/bin/env python
"""How much of the demo's subject rate the sample photos' style costs, on the embedded toy-world model.

The demo trains on ``datasets/sks_toy``: photos drawn by ``datasets/render_sample_subject.py``, whose robot
(a big round head, one large eye, a stout body) is not drawn the way the world's robots are. This script
trains the first demo recipe (``demo.demo_config`` with min-SNR-5 and batch 1, as the demo was when this was
measured: rank 8, attn+ff, lr 3e-3, 400 steps, prior
preservation from 50 class images, seed 0) on as many pictures of the same subject drawn by the WORLD's
renderer (``world.evaluate.subject_renders``), then judges 32 seeds of the demo's prompts as the demo does
(20 Euler steps, guidance 5), beside the same recipe trained on the sample photos (what the demo does). For
the teal robots drawn it also counts the eye colour and chest symbol the judge reads.

    python benchmarks/subject_style.py --out benchmarks/results/subject-style.json   # ~14 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parts(judge, images) -> dict:
    """Eye colours and chest symbols the judge reads on the teal robots among ``images``."""
    from collections import Counter

    teal = [r for r in judge.read(images) if r["kind"] == "robot" and r["colour"] == "teal"]
    return {"teal_robots": len(teal), **{f: dict(Counter(r[f] for r in teal).most_common()) for f in ("eye", "symbol")}}


def run(output: Path, methods: list[str], images: int, seeds: int, sources: list[str]) -> dict:
    from dora_diffusion.demo import FIRST_RECIPE, PROMPT, SAMPLE_DATA, SCENE_PROMPTS, demo_config
    from dora_diffusion.formats import load_adapter, unload_adapter
    from dora_diffusion.models import embedded_judge, load_pipeline
    from dora_diffusion.train import train
    from dora_diffusion.world.evaluate import contact_sheet, subject_presence, subject_renders

    data = output / "subject_renders"
    data.mkdir(parents=True, exist_ok=True)
    renders = subject_renders(images)
    for i, im in enumerate(renders):
        im.save(data / f"subject_{i:02d}.png")
    judge = embedded_judge()
    result: dict = {
        "what": "the demo's recipe trained on the subject drawn by the world's renderer",
        "training_images": images,
        "judge_reads_them_as_the_subject": sum(r["subject"] for r in judge.read(renders)) / images,
        "seeds": seeds,
        "runs": {},
    }
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    folders = {"photos": SAMPLE_DATA, "world": data}
    for source in sources:
        for method in methods:
            t = time.perf_counter()
            cfg = demo_config(output / source, method, 400)
            train(cfg.replace(data=str(folders[source]), class_data=str(output / "class_images"), **FIRST_RECIPE))
            row: dict = {"data": source, "train_seconds": time.perf_counter() - t}
            unload_adapter(pipe)
            load_adapter(pipe, output / source / method / "pytorch_lora_weights.safetensors")
            row["instance"], images_ = subject_presence(pipe, judge, PROMPT, range(seeds), steps=20)
            row["instance_parts"] = _parts(judge, images_)
            contact_sheet(images_, 8, 2).save(output / f"{source}-{method}.png")
            for prompt, scene in SCENE_PROMPTS.items():
                row[scene], _ = subject_presence(pipe, judge, prompt, range(seeds), scene=scene, steps=20)
            result["runs"][f"{source}/{method}"] = row
            print(source, method, json.dumps(row), flush=True)
    unload_adapter(pipe)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="outputs/subject-style", help="work folder (adapters, renders, sheets)")
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--methods", default="lora,dora")
    ap.add_argument("--sources", default="photos,world", help="photos: datasets/sks_toy; world: the renders")
    ap.add_argument("--images", type=int, default=7, help="training pictures (the sample folder has 7)")
    ap.add_argument("--seeds", type=int, default=32)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_adapters import write_result

    result = run(Path(args.output), args.methods.split(","), args.images, args.seeds, args.sources.split(","))
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
