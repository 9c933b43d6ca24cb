import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny models: one thread is as fast, and immune to OpenMP oversubscription when the machine is
# shared (seen here: 3x slower with 2 threads under load). Override with OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy

import pytest
import torch

from dora_diffusion.layers import adapter_modules

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_components():
    """The in-memory tiny SDXL components (built once; tests deep-copy what they change)."""
    from dora_diffusion.models import tiny_sdxl_components

    return tiny_sdxl_components(seed=0)


@pytest.fixture
def tiny_pipe(tiny_components):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))


def randomize_adapters(module: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every adapter parameter a random non-trivial value (B = 0 at init would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in adapter_modules(module):
            for n, p in a.named_parameters():
                if not n.startswith("base."):
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                    p.add_(noise * std * (p.abs().mean() if n == "magnitude" else 1.0))


def unet_inputs(unet, seed: int = 0, size: int = 16, batch: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    proj = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, cfg.in_channels, size, size, generator=g, dtype=torch.float64).to(dtype),
        timestep=torch.tensor([10] * batch),
        encoder_hidden_states=torch.randn(batch, 12, cfg.cross_attention_dim, generator=g, dtype=torch.float64).to(dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, proj, generator=g, dtype=torch.float64).to(dtype),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch, dtype=dtype),
        },
    )


def text_ids(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
