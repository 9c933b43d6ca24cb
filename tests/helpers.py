"""Plain helpers the test modules share (fixtures live in ``conftest.py``): paths, seeded inputs, adapters."""

import copy
import importlib.util
import socket
from pathlib import Path

import torch

from dora_diffusion import AdapterConfig, add_adapters, save_adapter
from dora_diffusion.layers import adapter_modules

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "datasets" / "sks_toy"  # the sample subject: seven photos, some with caption sidecars


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
        encoder_hidden_states=torch.randn(batch, 12, cfg.cross_attention_dim, generator=g, dtype=torch.float64).to(
            dtype
        ),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, proj, generator=g, dtype=torch.float64).to(dtype),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch, dtype=dtype),
        },
    )


def text_ids(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def write_adapter(tiny_components, folder: Path, method: str, seed: int) -> Path:
    """A LoRA or DoRA adapter with random non-zero weights, saved as a run folder."""
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method=method, rank=4, targets="attn"))
    randomize_adapters(unet, seed=seed, std=0.3)
    save_adapter({"unet": unet}, folder, metadata={"trained_steps": 10})
    return folder


def load_app_module():
    """``app/main.py`` as the CLI loads it (the app folder is not an installed package)."""
    spec = importlib.util.spec_from_file_location("dora_diffusion_app", REPO / "app" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
