#!/usr/bin/env python
"""What the embedded base model draws when the subject's parts are named in words: the judge's reading of
32 seeds per prompt (20 Euler steps, guidance 5; seeds 100-131, as ``demo_recipe.py``).

The world leaves out every teal robot with a heart (the sample subject's combination), so "teal robot" and
"robot with a heart" are each well known to the model, their combination never shown:

    python benchmarks/base_prompts.py --out benchmarks/results/base-prompts.json    # about 1 minute
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = (
    "a photo of a teal toy robot with a heart",
    "a photo of a red toy robot with a heart",
    "a photo of a teal toy robot",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", action="append", default=None, help="a prompt (default: the built-in three)")
    ap.add_argument("--seed0", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_adapters import write_result

    from dora_diffusion.models import embedded_judge, load_pipeline
    from dora_diffusion.threads import generation_threads
    from dora_diffusion.world.evaluate import subject_presence

    torch.set_num_threads(generation_threads()[0])
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    judge = embedded_judge()
    seeds = range(args.seed0, args.seed0 + args.seeds)
    rows = []
    for prompt in args.prompt or PROMPTS:
        row, images = subject_presence(pipe, judge, prompt, seeds, steps=20, batch=32)
        read = judge.read(images)
        row["heart"] = sum(r["symbol"] == "heart" for r in read) / len(read)
        rows.append(row)
        print(
            f"{prompt!r}: robot {row['robot']:.0%}, teal robot {row['teal_robot']:.0%}, heart {row['heart']:.0%}, "
            f"subject {row['subject']:.0%}",
            flush=True,
        )
    result = {"what": "the base model, judged", "seeds": [seeds.start, seeds.stop - 1], "rows": rows}
    write_result(result, args.out, show=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
