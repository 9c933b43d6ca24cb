"""What one micro-batch of a run is made of, SDXL's way: the data order (seeded permutations consumed by all
ranks together), independent seeded noise streams per (seed, step, rank) or (seed, image), and the prompt
encoding of both text encoders (pure helpers, the benchmarks call them too); and ``Batches``, which turns a
micro-batch's picks into latents, prompts and time ids, with the caches that make that cheap."""

from __future__ import annotations

import numpy as np
import torch

from .data import collate_examples


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``keys`` (independent streams per step, rank, image)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.Generator("cpu").manual_seed(seed)


def batch_indices(seed: int, micro_step: int, rank: int, world: int, batch_size: int, n: int) -> list[tuple[int, int]]:
    """``(image index, epoch)`` pairs of one rank's micro-batch: epochs are seeded permutations of the
    data, consumed in order by all ranks together, so the order depends only on the step."""
    out = []
    for j in range(batch_size):
        position = (micro_step * world + rank) * batch_size + j
        epoch, k = divmod(position, n)
        perm = torch.randperm(n, generator=seeded_generator(seed, 1, epoch))
        out.append((int(perm[k]), epoch))
    return out


def encode_prompts(text_encoders, tokenizers, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: both encoders' penultimate hidden states, concatenated; te2's pooled output."""
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # te2 (the last): projected pooled output, [B, projection_dim]
    return torch.cat(states, dim=-1), pooled


class Batches:
    """A run's micro-batch inputs from its datasets (``{"instance": ..., "class": ... or None}``): latents (the
    VAE's mean plus std times seeded noise; encoded once per image when ``config.cache_latents``), prompts and
    SDXL time ids; and the prompts' embeddings, cached when the text encoders are frozen."""

    def __init__(self, config, datasets: dict, vae, text_encoders, tokenizers, device) -> None:
        self.config, self.datasets, self.vae, self.tokenizers, self.device = config, datasets, vae, tokenizers, device
        dataset, class_dataset = datasets["instance"], datasets["class"]
        self.prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if not config.train_text_encoder:
            prompts = {dataset.example(i, 0)["prompt"] for i in range(len(dataset))}
            if class_dataset is not None:
                prompts.add(config.class_prompt)
            with torch.no_grad():
                for p in sorted(prompts):
                    embeds, pooled = encode_prompts(text_encoders, tokenizers, [p], device)
                    self.prompt_cache[p] = (embeds[0], pooled[0])
        # (latent, prompt, time ids) per image: the pixels are not kept once encoded
        self.latent_cache: dict[tuple[str, int], tuple[torch.Tensor, str, torch.Tensor]] = {}
        if config.cache_latents:
            for tag, ds in (("instance", dataset), ("class", class_dataset)):
                for i in range(len(ds) if ds is not None else 0):
                    b = collate_examples([ds.example(i, 0)])
                    gen = seeded_generator(config.seed, 2, i, tag == "class")
                    latent = self.encode_images(b["pixel_values"], gen)[0].cpu()
                    self.latent_cache[(tag, i)] = (latent, b["prompts"][0], b["add_time_ids"][0])

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae, device = self.vae, self.device
        with torch.no_grad():
            dist = vae.encode(pixels.to(device, torch.float32)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(device)
            return (dist.mean + dist.std * noise) * vae.config.scaling_factor

    def make_batch(
        self, tag: str, picks: list[tuple[int, int]], gen: torch.Generator
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """``(latents, prompts, time ids)`` of the ``(image index, epoch)`` picks of dataset ``tag``."""
        device = self.device
        if self.config.cache_latents:
            entries = [self.latent_cache[(tag, i)] for i, _ in picks]
            latents = torch.stack([e[0] for e in entries]).to(device)
            return latents, [e[1] for e in entries], torch.stack([e[2] for e in entries]).to(device)
        batch = collate_examples([self.datasets[tag].example(i, epoch) for i, epoch in picks])
        return self.encode_images(batch["pixel_values"], gen), batch["prompts"], batch["add_time_ids"].to(device)

    def conditioning(self, prompts: list[str], text_encoders) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' embeddings and pooled embeddings: from the cache, or encoded now (trained encoders)."""
        if self.prompt_cache:
            embeds = torch.stack([self.prompt_cache[p][0] for p in prompts])
            pooled = torch.stack([self.prompt_cache[p][1] for p in prompts])
            return embeds, pooled
        return encode_prompts(text_encoders, self.tokenizers, prompts, self.device)
