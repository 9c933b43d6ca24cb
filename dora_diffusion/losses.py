"""The diffusion loss, shared by the DreamBooth loop (``train``) and the toy world's pretraining
(``world.pretrain``): what the UNet predicts, the min-SNR-γ weights over timesteps, the weighted MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ConfigError


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"model: scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def loss_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-γ weights (Hang et al. 2023), or ``None`` for a plain mean."""
    if snr_gamma is None:
        return None
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """MSE in fp32: a plain mean, or each example's mean times its weight (``[B]``), averaged."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()
