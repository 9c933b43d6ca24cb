"""A run's optimizer and learning-rate schedule: AdamW (or bitsandbytes' 8-bit AdamW) over what the run trains
(the adapters, or the tuned layers under ``full``), the text encoders in a group of their own."""

from __future__ import annotations

import torch

from .config import ConfigError, TrainConfig
from .full import FULL, tuned_parameters
from .inject import adapter_parameters


def build_optimizer(config: TrainConfig, unet: torch.nn.Module, text_encoders: list[torch.nn.Module]):
    """``(optimizer, lr_scheduler)`` for ``config``: the UNet's trained parameters at ``learning_rate``, the
    text encoders' (when trained) at ``text_encoder_lr``; the schedule is stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    parameters_of = tuned_parameters if config.adapter.method == FULL else adapter_parameters
    groups = [{"params": parameters_of(unet), "lr": config.learning_rate}]
    if config.train_text_encoder:
        te_params = [p for te in text_encoders for p in parameters_of(te)]
        groups.append({"params": te_params, "lr": config.text_encoder_lr or config.learning_rate})
    optimizer_cls = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)") from None
        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(
        groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, weight_decay=config.weight_decay
    )
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    return optimizer, lr_scheduler
