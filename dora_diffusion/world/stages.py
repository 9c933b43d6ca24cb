"""The five stages of ``pretrain_tiny``, in order: ``data`` (render the world), ``vae`` (the autoencoder, its
scaling factor, every image's latents), ``judge`` (on renders and their VAE reconstructions), ``unet`` (the UNet
and both text encoders jointly, with an EMA) and ``export`` (the pipeline folder and the judge)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .judge import Judge, accuracy, judge_loss, targets
from .recipe import PretrainConfig, generator, render_world, to_model_input
from .resumable import Clock, Stage, train_loop
from .toys import Toy, captions, is_subject

RECONSTRUCTED = 4096  # VAE reconstructions the judge also learns from
TIME_IDS = (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)  # original size, crop corner, target size (SDXL micro-conditioning)


def stage_data(cfg: PretrainConfig, work: Path) -> None:
    stage = Stage(work, "data")
    if stage.done:
        return
    t0 = time.perf_counter()
    pixels, toys = render_world(cfg.images, cfg.seed)
    np.savez(work / "world.npz", pixels=pixels)
    (work / "world.json").write_text(json.dumps([t.attributes() for t in toys]), encoding="utf-8")
    stage.finish({"images": cfg.images, "seconds": time.perf_counter() - t0})


def _load_world(work: Path) -> tuple[np.ndarray, list[Toy]]:
    pixels = np.load(work / "world.npz")["pixels"]
    toys = [Toy(**a) for a in json.loads((work / "world.json").read_text(encoding="utf-8"))]
    return pixels, toys


def stage_vae(cfg: PretrainConfig, work: Path, components: dict, clock: Clock) -> bool:
    stage = Stage(work, "vae")
    vae = components["vae"]
    if stage.done:
        vae.load_state_dict(stage.load()["modules"]["vae"])
        vae.register_to_config(scaling_factor=stage.info()["scaling_factor"])
        return True
    pixels, _ = _load_world(work)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    c = cfg.vae_crop

    def step_fn(step: int) -> float:
        g = generator(cfg.seed, 2, step)
        idx = torch.randint(0, len(pixels), (cfg.vae_batch,), generator=g).numpy()
        top, left = (int(v) for v in torch.randint(0, 64 - c + 1, (2,), generator=g))
        x = to_model_input(pixels[idx, top : top + c, left : left + c])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            recon = vae.decode(z).sample
        loss = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x) + cfg.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    if not train_loop(stage, cfg, clock, cfg.vae_steps, {"vae": vae}, optimizer, [cfg.vae_lr], step_fn):
        return False
    vae.eval()
    # The latents of every image, and the scaling factor that gives them unit variance; reconstructions of
    # the first RECONSTRUCTED images for the judge (bf16 autocast: ~80 ms an image in fp32 on one core).
    means, stds, recon = [], [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(pixels), 256):
            post = vae.encode(to_model_input(pixels[i : i + 256])).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
            if i < RECONSTRUCTED:
                decoded = vae.decode(post.mean).sample.float()
                recon.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1))
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.std())
    recon_pixels = torch.cat(recon).numpy()
    originals = pixels[: len(recon_pixels)].astype(np.float32)
    mse = float((((recon_pixels.astype(np.float32) - originals) / 127.5) ** 2).mean())
    torch.save({"mean": mean.half(), "std": std.half()}, work / "latents.pt")
    np.savez(work / "recon.npz", pixels=recon_pixels)
    vae.register_to_config(scaling_factor=scaling)
    stage.finish(
        {"steps": cfg.vae_steps, "scaling_factor": scaling, "recon_mse": mse, "seconds": time.perf_counter() - t0}
    )
    return True


def _reconstruct(vae, pixels: np.ndarray) -> np.ndarray:
    """The VAE's reconstructions (bf16 autocast), uint8 like ``pixels``."""
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(pixels), 256):
            decoded = vae.decode(vae.encode(to_model_input(pixels[i : i + 256])).latent_dist.mean).sample.float()
            out.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def stage_judge(cfg: PretrainConfig, work: Path, clock: Clock, vae) -> tuple[bool, Judge]:
    stage = Stage(work, "judge")
    torch.manual_seed(cfg.seed)
    judge = Judge()
    if stage.done:
        judge.load_state_dict(stage.load()["modules"]["judge"])
        return True, judge.eval()
    pixels, toys = _load_world(work)
    recon = np.load(work / "recon.npz")["pixels"]
    if cfg.judge_robots:
        robots = work / "judge_robots.npz"
        extra, extra_toys = render_world(cfg.judge_robots, cfg.seed + 2, kind="robot", allow_subject=True)
        if not robots.is_file():
            np.savez(robots, recon=_reconstruct(vae.eval(), extra))
        extra_recon = np.load(robots)["recon"]
        # world images first (their first len(recon) have reconstructions), then the robots, all reconstructed
        pixels = np.concatenate([pixels[: len(recon)], extra, pixels[len(recon) :]])
        recon = np.concatenate([recon, extra_recon])
        toys = toys[: len(recon) - len(extra)] + extra_toys + toys[len(recon) - len(extra) :]
    labels = targets(toys)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=cfg.judge_lr, weight_decay=1e-4)
    judge.train()

    def step_fn(step: int) -> float:
        g = generator(cfg.seed, 3, step)
        idx = torch.randint(0, len(toys), (cfg.judge_batch,), generator=g)
        use_recon = (torch.rand(cfg.judge_batch, generator=g) < 0.5) & (idx < len(recon))
        batch = np.where(
            use_recon.numpy()[:, None, None, None], recon[idx.clamp(max=len(recon) - 1).numpy()], pixels[idx.numpy()]
        )
        x = to_model_input(batch)
        x = x + 0.03 * torch.randn(x.shape, generator=g)  # a little noise: generations are never clean
        flip = torch.rand(cfg.judge_batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = judge_loss(judge(x), {k: v[idx] for k, v in labels.items()})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if not train_loop(stage, cfg, clock, cfg.judge_steps, {"judge": judge}, optimizer, [cfg.judge_lr], step_fn):
        return False, judge
    judge.eval()
    held_pixels, held_toys = render_world(2000 if cfg.images >= 2000 else cfg.images, cfg.seed + 1)
    acc = accuracy(judge, to_model_input(held_pixels), held_toys)
    # and on robots of every colour x symbol: does it see the subject where it is, and only there?
    robot_pixels, robot_toys = render_world(min(1000, cfg.images), cfg.seed + 3, kind="robot", allow_subject=True)
    from PIL import Image

    read = judge.read([Image.fromarray(p) for p in robot_pixels])
    truth = [is_subject(t.kind, t.colour, t.symbol) for t in robot_toys]
    hits = [r["subject"] for r, t in zip(read, truth, strict=True) if t]
    false = [r["subject"] for r, t in zip(read, truth, strict=True) if not t]
    stage.finish(
        {
            "steps": cfg.judge_steps,
            "held_out_renders": len(held_toys),
            "accuracy": acc,
            "held_out_robots": len(robot_toys),
            "robot_accuracy": accuracy(judge, to_model_input(robot_pixels), robot_toys),
            "subject_recall": sum(hits) / max(1, len(hits)),
            "subject_robots": len(hits),
            "subject_false_positive": sum(false) / max(1, len(false)),
        }
    )
    return True, judge


def _caption_choice(toy: Toy, g: torch.Generator) -> str:
    """Half the time the most detailed caption, else any of the shorter ones."""
    options = captions(toy)
    if float(torch.rand((), generator=g)) < 0.5:
        return options[0]
    return options[int(torch.randint(1, len(options), (), generator=g))]


def stage_unet(cfg: PretrainConfig, work: Path, components: dict, clock: Clock) -> bool:
    from diffusers import DDPMScheduler

    from ..losses import diffusion_loss, loss_weights

    stage = Stage(work, "unet")
    unet, te1, te2 = components["unet"], components["text_encoder"], components["text_encoder_2"]
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    if stage.done:
        state = stage.load()
        for name, module in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
            module.load_state_dict(state["modules"][name])
        unet.load_state_dict(state["extra"]["ema"])
        return True
    _, toys = _load_world(work)
    latents = torch.load(work / "latents.pt", weights_only=True)
    mean, std = latents["mean"].float(), latents["std"].float()
    scaling = components["vae"].config.scaling_factor
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    tokenizers = (components["tokenizer"], components["tokenizer_2"])
    for m in (unet, te1, te2):
        m.train()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr},
            {"params": list(te1.parameters()) + list(te2.parameters()), "lr": cfg.text_lr},
        ],
        weight_decay=1e-2,
    )
    time_ids = torch.tensor([TIME_IDS])
    token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # SDXL's prompt encoding (as batches.encode_prompts), with the token ids of each caption cached
        for p in prompts:
            if p not in token_cache:
                token_cache[p] = tuple(
                    tok(
                        p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
                    ).input_ids[0]
                    for tok in tokenizers
                )
        states = []
        for i, encoder in enumerate((te1, te2)):
            out = encoder(torch.stack([token_cache[p][i] for p in prompts]), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), out[0]

    def step_fn(step: int) -> float:
        g = generator(cfg.seed, 4, step)
        b = cfg.unet_batch
        idx = torch.randint(0, len(toys), (b,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        prompts = [_caption_choice(toys[int(i)], g) for i in idx]
        hidden, pooled = encode(prompts)
        keep = (torch.rand(b, generator=g) >= cfg.caption_dropout).float()
        hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(
            noisy, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(b, 1)}
        ).sample
        loss = diffusion_loss(pred, noise, loss_weights(scheduler, t, cfg.snr_gamma))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        return loss.item()

    def get_extra() -> dict[str, Any]:
        return {"ema": ema}

    def set_extra(extra: dict[str, Any]) -> None:
        for k, v in extra["ema"].items():
            ema[k].copy_(v)

    modules = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    t0 = time.perf_counter()
    if not train_loop(
        stage,
        cfg,
        clock,
        cfg.unet_steps,
        modules,
        optimizer,
        [cfg.unet_lr, cfg.text_lr],
        step_fn,
        (get_extra, set_extra),
    ):
        return False
    unet.load_state_dict(ema)
    stage.finish({"steps": cfg.unet_steps, "seconds_this_chunk": time.perf_counter() - t0})
    return True


def stage_export(cfg: PretrainConfig, work: Path, components: dict, judge: Judge, output: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline

    from .. import _tiny_vocab
    from ..models import TINY_MARKER

    for m in ("unet", "vae", "text_encoder", "text_encoder_2"):
        components[m].eval()
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        _tiny_vocab.write_tokenizer_files(output / folder)
    judge.save(output / "judge", metrics=Stage(work, "judge").info())
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("work", "output", "max_minutes", "stop_after", "extra")}
    marker = {"builder": "dora_diffusion.world.pretrain", "kind": "toy-world", "recipe": recipe}
    (output / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return output
