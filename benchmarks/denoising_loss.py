"""Denoising loss of trained runs on fixed inputs, the same for every run: the instance prompt on the subject's
photos and the class prompt on the class images, at ten timesteps with fixed noise (centre crops, no flip).
The training log's loss is one random timestep of one image per step; this is the comparable number.

    python benchmarks/denoising_loss.py outputs/analysis/lora outputs/analysis/full-1e-4 ... \
        --class-data outputs/analysis/class_images --out docs/analysis/denoising_loss.json

Runs are run folders: LoRA/DoRA (their adapter) or full fine-tuning (their ``unet/`` folder); the base
model (what the runs recorded; default the embedded one) is measured too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from dora_diffusion import runs
from dora_diffusion.batches import encode_prompts, seeded_generator
from dora_diffusion.data import SubjectDataset, collate_examples, scan_subject_folder
from dora_diffusion.formats import load_adapter
from dora_diffusion.losses import training_target
from dora_diffusion.models import load_pipeline, model_folder, native_resolution, resolve_model

TIMESTEPS = tuple(range(50, 1000, 100))  # 50, 150, ..., 950


@torch.no_grad()
def fixed_inputs(pipe, folder: str, prompt: str, resolution: int, limit: int | None, tag: int) -> list[tuple]:
    """(latent, prompt, time ids) per image: the VAE mean of the centre crop."""
    report = scan_subject_folder(folder, resolution)
    report.used = sorted(report.used, key=lambda r: r.path.name)[:limit]
    ds = SubjectDataset(report, prompt, resolution, center_crop=True, flip_p=0.0, seed=0)
    out = []
    for i in range(len(ds)):
        b = collate_examples([ds.example(i, 0)])
        latent = pipe.vae.encode(b["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor
        out.append((latent[0], b["prompts"][0], b["add_time_ids"][0], tag, i))
    return out


@torch.no_grad()
def mean_loss(pipe, inputs: list[tuple]) -> float:
    te = [pipe.text_encoder, pipe.text_encoder_2]
    tok = [pipe.tokenizer, pipe.tokenizer_2]
    total, n = 0.0, 0
    for latent, prompt, ids, tag, i in inputs:
        embeds, pooled = encode_prompts(te, tok, [prompt], "cpu")
        t = torch.tensor(TIMESTEPS)
        noise = torch.stack([torch.randn(latent.shape, generator=seeded_generator(7, tag, i, s)) for s in TIMESTEPS])
        lat = latent.expand(len(TIMESTEPS), *latent.shape)
        noisy = pipe.scheduler.add_noise(lat, noise, t)
        k = len(TIMESTEPS)
        pred = pipe.unet(
            noisy,
            t,
            embeds.expand(k, -1, -1),
            added_cond_kwargs={"text_embeds": pooled.expand(k, -1), "time_ids": ids.expand(k, -1)},
        ).sample
        target = training_target(pipe.scheduler, lat, noise, t)
        total += float(torch.nn.functional.mse_loss(pred, target, reduction="sum"))
        n += target.numel()
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data", default="datasets/sks_toy")
    parser.add_argument("--prompt", default="a photo of sks toy")
    parser.add_argument("--class-data", required=True)
    parser.add_argument("--class-prompt", default="a photo of a toy")
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file of the results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = runs.base_model(args.runs[0])
    resolution = native_resolution(model_folder(resolve_model(model)))
    base = load_pipeline(model)
    base.scheduler = DDPMScheduler.from_config(base.scheduler.config)  # the training's noise schedule
    inst = fixed_inputs(base, args.data, args.prompt, resolution, None, 0)
    cls = fixed_inputs(base, args.class_data, args.class_prompt, resolution, args.class_images, 1)
    results = {"base": {"instance": mean_loss(base, inst), "class": mean_loss(base, cls)}}
    for run in args.runs:
        pipe = load_pipeline(model)
        pipe.scheduler = base.scheduler
        if runs.recorded_method(run) == "full":
            unet = UNet2DConditionModel.from_pretrained(
                runs.tuned_component_dir(run, "unet"), local_files_only=True, use_safetensors=True
            )
            pipe.register_modules(unet=unet)
        else:
            load_adapter(pipe, run)
        results[Path(run).name] = {"instance": mean_loss(pipe, inst), "class": mean_loss(pipe, cls)}
    for name, r in results.items():
        print(f"{name:12s} instance {r['instance']:.4f}  class {r['class']:.4f}")
    if args.out:
        doc = {
            "timesteps": list(TIMESTEPS),
            "instance_images": len(inst),
            "class_images": len(cls),
            "losses": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
