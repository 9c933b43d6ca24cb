#!/usr/bin/env python
"""The full-size SDXL UNet (2.57 B parameters, random weights from ``../shared/sdxl/``) on a CPU: the README's
headline table. bf16 base weights with fp32 adapters under bf16 autocast, UNet attention targets, rank 8,
batch 1, AdamW, one model per process where memory needs it (24 GB is enough for two full UNets with their
activations at 512 px, not for three with PEFT's DoRA among them). Runs, each its own process:

1. training step, per resolution (256 and 512 px): ours-lora with ours-dora alternating step by step in one
   process (with a torch.profiler op table of each), then ours-lora with peft-dora likewise: PEFT's DoRA
   gets its own process beside our LoRA, and ``PEFT DoRA / ours DoRA`` goes through our LoRA of each;
2. peak memory at 256 px: one process per variant (ours-lora, ours-dora, ours-dora-exact), then ours-lora
   and ours-dora with gradient checkpointing: the peak RSS growth over the loaded model;
3. sampling at 512 px (``bench_sampling.py``): base, LoRA and DoRA unmerged, DoRA merged.

Every run writes its JSON to ``--out-dir``; this script then writes ``cpu-full-summary.json`` and the
Markdown table (``cpu-full-summary.md``) from them (``--summarize-only`` redoes just that).

    python benchmarks/full_cpu.py                      # ~15 min on a quiet 2-core machine
    python benchmarks/full_cpu.py --resolutions 256 --skip-memory --skip-sampling
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20
COMMON = ["--device", "cpu", "--dtype", "bfloat16", "--autocast", "--rank", "8"]


def run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def measure(
    out: Path, size: str, resolutions: list[int], rounds: int, threads: int | None, memory: bool, sampling: bool
):
    t = ["--size", size] + ([] if threads is None else ["--threads", str(threads)])
    bench = str(HERE / "bench_adapters.py")
    for res in resolutions:
        for pair, extra in (("ours-lora,ours-dora", ["--profile"]), ("ours-lora,peft-dora", [])):
            name = "ours" if "ours-dora" in pair else "peft"
            run(
                [bench, *COMMON, *t, "--resolution", str(res), "--in-process", "--variants", pair]
                + ["--steps", str(rounds), "--warmup", "1", "--repeats", "1", *extra]
                + ["--out", str(out / f"cpu-full-{res}-{name}.json")]
            )
    if memory:
        for gc, variants in (
            ([], "ours-lora,ours-dora,ours-dora-exact"),
            (["--gradient-checkpointing"], "ours-lora,ours-dora"),
        ):
            tag = "-gc" if gc else ""
            run(
                [bench, *COMMON, *t, "--resolution", "256", "--variants", variants, *gc]
                + ["--steps", "2", "--warmup", "1", "--repeats", "1"]
                + ["--out", str(out / f"cpu-full-256-memory{tag}.json")]
            )
    if sampling:
        run(
            [str(HERE / "bench_sampling.py"), "--dtype", "bfloat16", "--resolution", "512", *t]
            + ["--rounds", str(rounds), "--out", str(out / "cpu-full-sampling-512.json")]
        )


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(out: Path) -> dict:
    rows, memory, sampling, machine = [], [], None, None
    found = sorted(int(f.name.split("-")[2]) for f in out.glob("cpu-full-*-ours.json"))
    for res in found:
        ours, peft = _load(out / f"cpu-full-{res}-ours.json"), _load(out / f"cpu-full-{res}-peft.json")
        if not ours:
            continue
        machine = machine or ours["machine"]
        o = ours["variants"]
        lora, dora = o["ours-lora"]["median_step_s"], o["ours-dora"]["median_step_s"]
        row = {
            "resolution": res,
            "latent": res // 8,
            "ours_lora_s": lora,
            "ours_dora_s": dora,
            "ours_dora/ours_lora": dora / lora,
            "ours_dora/ours_lora (step by step)": ours["ratios"].get("ours-dora/ours-lora step (step by step)"),
            "saved_activations_dora/lora": ours["ratios"]["ours-dora/ours-lora saved activations"],
        }
        if peft:
            p = peft["variants"]
            peft_over_lora = peft["ratios"].get("peft-dora/ours-lora step (step by step)") or (
                p["peft-dora"]["median_step_s"] / p["ours-lora"]["median_step_s"]
            )
            row.update(
                {
                    "peft_dora_s": p["peft-dora"]["median_step_s"],
                    "peft_dora/ours_lora": peft_over_lora,
                    "peft_dora/ours_dora": peft_over_lora / (row["ours_dora/ours_lora (step by step)"] or dora / lora),
                    "saved_activations_peft_dora/ours_lora": p["peft-dora"]["saved_activation_bytes"]
                    / p["ours-lora"]["saved_activation_bytes"],
                }
            )
        rows.append(row)
    for tag, label in (("", "no checkpointing"), ("-gc", "gradient checkpointing")):
        m = _load(out / f"cpu-full-256-memory{tag}.json")
        if not m:
            continue
        machine = machine or m["machine"]
        base = m["variants"]["ours-lora"]["median_peak_increase_bytes"]
        for v, s in m["variants"].items():
            memory.append(
                {
                    "mode": label,
                    "variant": v,
                    "peak_rss_increase_mib": s["median_peak_increase_bytes"] / MIB,
                    "ratio_to_ours_lora": s["median_peak_increase_bytes"] / base,
                    "saved_activations_mib": s["saved_activation_bytes"] / MIB,
                    "step_s": s["median_step_s"],
                }
            )
    s = _load(out / "cpu-full-sampling-512.json")
    if s:
        machine = machine or s["machine"]
        sampling = {"median_step_s": s["median_step_s"], "ratios": s["ratios"]}
    summary = {"machine": machine, "training": rows, "memory": memory, "sampling": sampling}
    (out / "cpu-full-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    (out / "cpu-full-summary.md").write_text(md)
    print(md)
    return summary


def markdown(summary: dict) -> str:
    lines = []
    if summary["training"]:
        lines += [
            "| image (latent) | our LoRA s/step | our DoRA / our LoRA | (ratio of medians) | PEFT DoRA / our LoRA "
            "| PEFT DoRA / our DoRA |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in summary["training"]:
            peft = {k: f"{r[k]:.2f}" if k in r else "–" for k in ("peft_dora/ours_lora", "peft_dora/ours_dora")}
            lines.append(
                f"| {r['resolution']} px ({r['latent']}²) | {r['ours_lora_s']:.2f} | "
                f"{r['ours_dora/ours_lora (step by step)'] or r['ours_dora/ours_lora']:.3f} | "
                f"{r['ours_dora/ours_lora']:.3f} | "
                f"{peft['peft_dora/ours_lora']} | {peft['peft_dora/ours_dora']} |"
            )
        lines.append("")
    if summary["memory"]:
        lines += [
            "| 256 px, peak RSS growth | variant | MiB | / our LoRA | saved activations MiB |",
            "|---|---|---:|---:|---:|",
        ]
        for m in summary["memory"]:
            lines.append(
                f"| {m['mode']} | {m['variant']} | {m['peak_rss_increase_mib']:.0f} | {m['ratio_to_ours_lora']:.3f} | "
                f"{m['saved_activations_mib']:.0f} |"
            )
        lines.append("")
    if summary["sampling"]:
        s, r = summary["sampling"]["median_step_s"], summary["sampling"]["ratios"]
        lines += [
            "| 512 px sampling step (CFG batch 2) | s | ratio |",
            "|---|---:|---:|",
            f"| base | {s['base']:.2f} | 1.000 |",
            f"| LoRA unmerged | {s['lora']:.2f} | {r['lora/base']:.3f} |",
            f"| DoRA unmerged | {s['dora']:.2f} | {r['dora/base']:.3f} (DoRA / LoRA "
            f"{r.get('dora/lora (unmerged, round by round)', r['dora/lora (unmerged)']):.3f} round by round) |",
            f"| DoRA merged | {s['dora-merged']:.2f} | {r['dora-merged/base']:.3f} |",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--size", default="full", help="the UNet (tiny / medium: a quick check of this script)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant, alternating (median)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.summarize_only:
        resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
        measure(out, args.size, resolutions, args.rounds, args.threads, not args.skip_memory, not args.skip_sampling)
    summarize(out)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
