"""The training configuration: one typed, documented, validated dataclass.

Every field is a CLI option (``--learning-rate`` for ``learning_rate``) and a key of a TOML/YAML config
file (``--config run.toml``); options given on the command line win over the file. The resolved
config is written next to every run's output as ``training_config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

from .full import FULL
from .inject import METHODS, PRESETS, AdapterConfig, target_patterns


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


MIXED_PRECISION = ("no", "fp16", "bf16")
TRAIN_METHODS = (*METHODS, FULL)  # the adapters, and full fine-tuning of the targeted layers
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(ValueError):
    """A bad training option; the message names the field."""


def parse_policy(text: str | None) -> dict[str, str] | None:
    """``"ff=magnitude, attn2.to_k=lora"`` -> ``{"ff": "magnitude", "attn2.to_k": "lora"}``."""
    if not text:
        return None
    policy = {}
    for part in text.split(","):
        key, sep, method = part.partition("=")
        if not sep or not key.strip() or not method.strip():
            raise ConfigError(f"policy: expected GROUP=METHOD pairs separated by commas, got {part.strip()!r}")
        policy[key.strip()] = method.strip()
    return policy


@dataclass
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
    method: str = _opt(
        "dora",
        "Adapter: 'lora', 'dora' (magnitude + low-rank direction), 'magnitude' (magnitude only) "
        "or 'dvora' (magnitude + VeRA direction); or 'full': no adapter, the targeted layers themselves are "
        "trained (full fine-tuning, the DoRA paper's FT baseline; writes <output>/unet).",
        choices=TRAIN_METHODS,
        group="adapter",
    )
    rank: int = _opt(8, "Rank of the low-rank update (not used by full).", group="adapter")
    alpha: float | None = _opt(
        None,
        "LoRA alpha; the update is scaled by alpha/rank. Default: alpha = rank. Not used by full.",
        group="adapter",
    )
    targets: str = _opt(
        "attn",
        f"Layers to adapt (full: to train): a preset ({', '.join(PRESETS)}) or comma-separated whole module names.",
        group="adapter",
    )
    policy: str | None = _opt(
        None,
        "Tuning granularity (paper §5.6): per-group methods, e.g. 'ff=magnitude' (DoRA on attention, "
        "magnitude only on feed-forward). Groups: attn, ff, or whole module names. Not with full.",
        group="adapter",
    )
    dropout: float = _opt(0.0, "Dropout on the adapter input (not with full).", group="adapter")
    norm_grad: str = _opt(
        "detach",
        "DoRA: 'detach' the weight norm in backprop (paper §4.3) or keep its 'exact' gradient (not with full).",
        choices=("detach", "exact"),
        group="adapter",
    )
    memory_saving: bool = _opt(
        True,
        "DoRA: recompute residual-tail layer outputs in backward (no activation beyond LoRA's, ~4% slower on CPU); "
        "--no-memory-saving keeps them.",
        group="adapter",
    )
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

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}: {why}")

        if self.method not in TRAIN_METHODS:
            raise bad("method", f"must be one of {', '.join(TRAIN_METHODS)}, got {self.method!r}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise bad("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation",
            "num_validation_images",
            "validation_inference_steps",
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
        if self.method == FULL:
            self._check_full()
        else:
            self.adapter_config()  # validates rank, alpha, dropout, targets

    def _check_full(self) -> None:
        """Full fine-tuning has no adapter: refuse the adapter options that would change nothing."""
        if not target_patterns(self.targets):
            raise ConfigError("targets: empty")
        for name, given in (
            ("policy", bool(self.policy)),
            ("dropout", self.dropout != 0.0),
            ("norm_grad", self.norm_grad != "detach"),
        ):
            if given:
                raise ConfigError(
                    f"{name}: an adapter option; method 'full' trains the targeted layers themselves "
                    f"and has no adapter (got {name} = {getattr(self, name)!r})"
                )

    def adapter_config(self) -> AdapterConfig:
        if self.method == FULL:
            raise ConfigError(
                "method: 'full' trains the targeted layers themselves and has no adapter; "
                "its run writes the tuned UNet as a diffusers folder (<output>/unet)"
            )
        try:
            return AdapterConfig(
                method=self.method,
                rank=self.rank,
                alpha=self.alpha,
                targets=self.targets,
                dropout=self.dropout,
                norm_grad=self.norm_grad,
                vera_seed=self.seed,
                policy=parse_policy(self.policy),
                memory_saving=self.memory_saving,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------- config files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of a TOML, YAML or JSON config file (a ``[train]`` table / ``train:`` mapping, or top level)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config: {path} must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config: {path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a table of options")
    data = data.get("train", data)
    known = {f.name for f in fields(TrainConfig)}
    normalised = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(f"config: {path} has unknown option(s) {', '.join(unknown)}")
    return normalised


# ----------------------------------------------------------------------------- argparse bridge


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


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type = TrainConfig, required: tuple[str, ...] = ()
) -> None:
    """One ``--option`` per dataclass field, grouped, with the field's help; defaults left to the dataclass."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta.get("group", "options"), parser.add_argument_group(meta.get("group", "options")))
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(f.type)
        default = f.default
        shown = "" if default in (None, "", False) else f" (default: {default})"
        text = (meta["help"] + shown).replace("%", "%%")  # argparse formats help with %: "~4% slower" is text
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(
                flag,
                type=tp,
                default=argparse.SUPPRESS,
                choices=meta.get("choices"),
                help=text,
                required=f.name in required,
            )


def resumed_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options the run that ``values`` resume was started with: its checkpoint's (``resume`` a
    checkpoint folder) or its output folder's ``training_config.json`` (``resume = "latest"``); ``{}``
    when not resuming or nothing was saved. So ``--output X --resume latest`` continues run X as it was."""
    from . import runs

    resume = values.get("resume")
    if not resume:
        return {}
    run = Path(values.get("output") or TrainConfig.output)
    source = runs.config_file(run) if resume == "latest" else Path(resume) / runs.STATE_NAME
    if not source.is_file():
        return {}
    try:
        saved = runs.read_run_config(run) if resume == "latest" else runs.read_checkpoint_state(resume)["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"resume: {source} could not be read ({e})") from None
    names = {f.name for f in fields(TrainConfig)} - {"resume", "overwrite"}
    return {k: v for k, v in saved.items() if k in names}


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """The config file's values (``args.config``), overridden by the options given on the command line;
    when resuming, the run's saved options fill in what neither gives."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    names = {f.name for f in fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    if cls is TrainConfig:
        values = {**resumed_options(values), **values}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
