"""The training configuration: one typed, documented, validated dataclass, the adapter's nested in it.

Every option is a CLI flag (``--learning-rate`` for ``learning_rate``) and a key of a TOML/YAML config
file (``--config run.toml``, read by ``config_args``); options given on the command line win over the file.
The options are flat: the adapter's (``method``, ``rank``, ...) sit beside the run's, as ``to_flat`` writes
them and ``TrainConfig(**options)`` reads them; ``AdapterConfig`` holds and checks the adapter's. The
resolved config is written next to every run's output as ``training_config.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, get_args

from .adapter_config import FULL, TRAIN_METHODS, AdapterConfig, format_policy
from .targets import PRESETS, AdapterError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(ValueError):
    """A bad training option; the message names the field."""


class Option(NamedTuple):
    """One flat option: a ``--flag`` of the CLI, a key of config files and of ``training_config.json``."""

    name: str
    type: type
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None = None


_ADAPTER_DEFAULTS = {f.name: f.default for f in fields(AdapterConfig)}


def _adapter_option(name: str, type: type, help: str, choices: tuple[str, ...] | None = None) -> Option:
    return Option(name, type, _ADAPTER_DEFAULTS[name], help, "adapter", choices)


# The adapter's options as the CLI and the config files spell them; ``AdapterConfig`` holds and checks them.
ADAPTER_OPTIONS = (
    _adapter_option(
        "method",
        str,
        "Adapter: 'lora', 'dora' (magnitude + low-rank direction), 'magnitude' (magnitude only) "
        "or 'dvora' (magnitude + VeRA direction); or 'full': no adapter, the targeted layers themselves are "
        "trained (full fine-tuning, the DoRA paper's FT baseline; writes <output>/unet).",
        TRAIN_METHODS,
    ),
    _adapter_option("rank", int, "Rank of the low-rank update (not used by full)."),
    _adapter_option(
        "alpha", float, "LoRA alpha; the update is scaled by alpha/rank. Default: alpha = rank. Not used by full."
    ),
    _adapter_option(
        "targets",
        str,
        f"Layers to adapt (full: to train): a preset ({', '.join(PRESETS)}) or comma-separated whole module names.",
    ),
    _adapter_option(
        "policy",
        str,
        "Tuning granularity (paper §5.6): per-group methods, e.g. 'ff=magnitude' (DoRA on attention, "
        "magnitude only on feed-forward). Groups: attn, ff, or whole module names. Not with full.",
    ),
    _adapter_option("dropout", float, "Dropout on the adapter input (not with full)."),
    _adapter_option(
        "norm_grad",
        str,
        "DoRA: 'detach' the weight norm in backprop (paper §4.3) or keep its 'exact' gradient (not with full).",
        ("detach", "exact"),
    ),
    _adapter_option(
        "memory_saving",
        bool,
        "DoRA: recompute residual-tail layer outputs in backward (no activation beyond LoRA's, ~4% slower on CPU); "
        "--no-memory-saving keeps them.",
    ),
)
ADAPTER_NAMES = tuple(o.name for o in ADAPTER_OPTIONS)


def _with_options(adapter: AdapterConfig, options: Mapping[str, Any]) -> AdapterConfig:
    """``adapter`` with the flat adapter ``options`` changed (checked by ``AdapterConfig``)."""
    try:
        return dataclasses.replace(adapter, **options)
    except AdapterError as e:
        raise ConfigError(str(e)) from None


@dataclass(init=False)
class TrainConfig:
    """Everything a DreamBooth run depends on (with the seed, the run is reproducible)."""

    # --- what to train on
    data: str = _opt(
        "", "Folder of subject images (jpg, png, webp, bmp); optional name.txt caption sidecars.", group="data"
    )
    prompt: str = _opt(
        "", "Instance prompt naming the subject with a rare token, e.g. 'a photo of sks toy'.", group="data"
    )
    output: str = _opt(
        "outputs/run",
        "Output folder. An existing non-empty folder is refused unless --resume or --overwrite.",
        group="data",
    )
    model: str | None = _opt(
        None,
        "Base SDXL model: a local diffusers folder or a hub id already in the local cache. "
        "Default: the embedded tiny model.",
        group="data",
    )
    resolution: int | None = _opt(
        None,
        "Training resolution in pixels (multiple of 8). Default: the model's native size (1024 for SDXL).",
        group="data",
    )
    center_crop: bool = _opt(False, "Center crop instead of random crop.", group="data")
    flip_p: float = _opt(0.5, "Probability of a horizontal flip per example.", group="data")
    # --- the adapter
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"options": ADAPTER_OPTIONS})
    """The adapter (or ``full``'s targeted layers): flat in the CLI and the files, as ``ADAPTER_OPTIONS``.
    Its ``vera_seed`` is the run's ``seed``."""
    train_text_encoder: bool = _opt(
        False,
        "Also put adapters on both text encoders (full: tune their targeted layers) and train them.",
        group="adapter",
    )
    # --- prior preservation
    class_prompt: str | None = _opt(
        None, "Class prompt, e.g. 'a photo of a toy'; turns on prior preservation.", group="prior preservation"
    )
    class_data: str | None = _opt(
        None,
        "Folder of class images; missing ones are generated with the base model and kept. "
        "Default: <output>/../class_images/<class prompt>.",
        group="prior preservation",
    )
    num_class_images: int = _opt(50, "How many class images prior preservation uses.", group="prior preservation")
    prior_loss_weight: float = _opt(1.0, "Weight of the prior-preservation loss.", group="prior preservation")
    sample_batch_size: int = _opt(
        4, "Class images generated per batch (as diffusers' DreamBooth scripts).", group="prior preservation"
    )
    # --- optimisation
    max_steps: int = _opt(500, "Optimizer steps to train.", group="optimisation")
    batch_size: int = _opt(1, "Examples per device per micro-batch.", group="optimisation")
    gradient_accumulation: int = _opt(1, "Micro-batches per optimizer step.", group="optimisation")
    learning_rate: float = _opt(
        1e-4, "Learning rate of the UNet adapters (full: of its tuned layers).", group="optimisation"
    )
    text_encoder_lr: float | None = _opt(
        None,
        "Learning rate of the text-encoder adapters (full: tuned layers). Default: --learning-rate.",
        group="optimisation",
    )
    lr_schedule: str = _opt("constant", "Learning-rate schedule.", choices=LR_SCHEDULES, group="optimisation")
    lr_warmup_steps: int = _opt(0, "Linear warm-up steps.", group="optimisation")
    weight_decay: float = _opt(1e-4, "AdamW weight decay.", group="optimisation")
    adam_beta1: float = _opt(0.9, "AdamW beta1.", group="optimisation")
    adam_beta2: float = _opt(0.999, "AdamW beta2.", group="optimisation")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", group="optimisation")
    use_8bit_adam: bool = _opt(False, "8-bit AdamW from bitsandbytes (must be installed; CUDA).", group="optimisation")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).", group="optimisation")
    snr_gamma: float | None = _opt(
        None, "Min-SNR-γ loss weighting (5.0 is the paper's value). Default: off.", group="optimisation"
    )
    noise_offset: float = _opt(
        0.0, "Noise offset (e.g. 0.05) for darker darks and brighter brights.", group="optimisation"
    )
    # --- speed and memory
    mixed_precision: str = _opt(
        "no",
        "Mixed precision: 'no', 'fp16' or 'bf16' (frozen weights in that dtype, adapters fp32).",
        choices=MIXED_PRECISION,
        group="speed and memory",
    )
    gradient_checkpointing: bool = _opt(
        False, "Recompute UNet activations in backward: less memory, ~30% slower.", group="speed and memory"
    )
    cache_latents: bool = _opt(
        True,
        "Encode each image with the VAE once (fixes each image's crop and flip to its first draw).",
        group="speed and memory",
    )
    # --- reproducibility, validation, checkpoints
    seed: int = _opt(
        0, "Seed for everything random: data order, noise, timesteps, dropout, validation images.", group="run"
    )
    validation_prompt: str | None = _opt(
        None, "Prompt of the validation images. Default: the instance prompt.", group="run"
    )
    validation_steps: int = _opt(
        100, "Validation images every N steps (and at the end); 0 = only at the end.", group="run"
    )
    num_validation_images: int = _opt(2, "Validation images per validation (seeds seed, seed+1, ...).", group="run")
    validation_inference_steps: int = _opt(25, "Denoising steps of the validation images.", group="run")
    validation_guidance: float = _opt(5.0, "Guidance scale of the validation images.", group="run")
    checkpoint_steps: int = _opt(
        0, "Checkpoint (adapter, optimizer, scheduler, RNG) every N steps; 0 = off.", group="run"
    )
    checkpoints_total_limit: int | None = _opt(None, "Keep only the newest N checkpoints.", group="run")
    resume: str | None = _opt(None, "Resume from 'latest' or a checkpoint folder.", group="run")
    overwrite: bool = _opt(
        False, "Allow writing into an existing non-empty output folder (files there may be replaced).", group="run"
    )
    report_to: str = _opt("tensorboard", "Experiment tracker for accelerate ('tensorboard', 'none', ...).", group="run")
    log_every: int = _opt(1, "Write loss, learning rate and step time to train_log.jsonl every N steps.", group="run")

    def __init__(self, **options: Any) -> None:
        """Every field by keyword, and the adapter's options flat beside them (``method="lora", rank=4``:
        into ``adapter``), as the CLI, the config files and ``to_flat`` name them."""
        given = {k: options.pop(k) for k in ADAPTER_NAMES if k in options}
        for f in fields(self):
            if f.name in options:
                setattr(self, f.name, options.pop(f.name))
            else:
                setattr(self, f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        for name in options:
            raise TypeError(f"TrainConfig.__init__() got an unexpected keyword argument {name!r}")
        self.__post_init__()
        if given:
            self.adapter = _with_options(self.adapter, given)
        if self.adapter.vera_seed != self.seed:
            self.adapter = dataclasses.replace(self.adapter, vera_seed=self.seed)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}: {why}")

        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise bad("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation",
            "num_validation_images",
            "validation_inference_steps",
            "sample_batch_size",
        ):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "adam_epsilon"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        for name in (
            "validation_steps",
            "checkpoint_steps",
            "lr_warmup_steps",
            "num_class_images",
            "max_grad_norm",
            "noise_offset",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        if not 0 <= self.flip_p <= 1:
            raise bad("flip_p", f"must be in [0, 1], got {self.flip_p}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise bad("snr_gamma", f"must be positive, got {self.snr_gamma}")

    def adapter_config(self) -> AdapterConfig:
        """The adapters the run puts on its models; ``full`` has none."""
        if self.adapter.method == FULL:
            raise ConfigError(
                "method: 'full' trains the targeted layers themselves and has no adapter; "
                "its run writes the tuned UNet as a diffusers folder (<output>/unet)"
            )
        return self.adapter

    def to_flat(self) -> dict[str, Any]:
        """The options by flat name, in ``options_of(TrainConfig)``'s order: ``TrainConfig(**flat)`` reads them back."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "adapter":
                a = self.adapter
                flat.update({name: getattr(a, name) for name in ADAPTER_NAMES})
                flat["targets"] = a.targets if isinstance(a.targets, str) else list(a.targets)
                flat["policy"] = format_policy(a.policy)
            else:
                flat[f.name] = getattr(self, f.name)
        return flat

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; the adapter's options by their flat names too (``replace(rank=4)``)."""
        return dataclasses.replace(self, **changes)


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):  # from __future__ annotations
        tp = {
            "int": int,
            "float": float,
            "str": str,
            "bool": bool,
            "int | None": int,
            "float | None": float,
            "str | None": str,
        }[tp]
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def options_of(cls: type = TrainConfig) -> tuple[Option, ...]:
    """The flat options of a config dataclass, in order: one per field, a nested config's (a field with
    ``options`` in its metadata: ``TrainConfig.adapter``) in its place."""
    found: list[Option] = []
    for f in fields(cls):
        meta = f.metadata
        if "options" in meta:
            found += meta["options"]
        else:
            found.append(
                Option(
                    f.name,
                    _base_type(f.type),
                    f.default,
                    meta["help"],
                    meta.get("group", "options"),
                    meta.get("choices"),
                )
            )
    return tuple(found)


OPTION_NAMES = frozenset(o.name for o in options_of(TrainConfig))
