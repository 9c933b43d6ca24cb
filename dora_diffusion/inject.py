"""Choosing target modules, wrapping them in adapters, adapter state dicts, merging.

Target patterns are matched on WHOLE dotted module names, never on substrings: a pattern matches
a module when it equals the name or a dotted suffix of it (``to_q`` matches
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, never ``to_qkv`` or
``add_k_proj``). ``*`` and ``?`` work within the pattern (``attn1.to_*``, ``down_blocks.*.to_q``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers import (
    ADAPTER_CLASSES,
    RESIDUAL_TAILS,
    AdapterLinear,
    DoRALinear,
    DVoRALinear,
    LoRALinear,
    MagnitudeLinear,
    adapter_modules,
)

METHODS = ("lora", "dora", "magnitude", "dvora")
FULL = "full"  # no adapter: the targeted layers themselves are trained (full.py)
TRAIN_METHODS = (*METHODS, FULL)

# Presets per component family. UNet names are diffusers'; CLIP names are transformers'.
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FF = ("ff.net.0.proj", "ff.net.2")
CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_FF = ("mlp.fc1", "mlp.fc2")
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": UNET_ATTN + CLIP_ATTN,
    "attn+ff": UNET_ATTN + UNET_FF + CLIP_ATTN + CLIP_FF,
    "all-linear": ("*",),
}
# Group names a granularity policy may use.
POLICY_GROUPS: dict[str, tuple[str, ...]] = {"attn": UNET_ATTN + CLIP_ATTN, "ff": UNET_FF + CLIP_FF}
# Never adapted by `all-linear`: the text encoders' output projection (the "head").
ALL_LINEAR_EXCLUDE = ("text_projection",)


class AdapterError(ValueError):
    """A bad adapter configuration, target or state dict."""


def parse_policy(text: str | None) -> dict[str, str] | None:
    """``"ff=magnitude, attn2.to_k=lora"`` -> ``{"ff": "magnitude", "attn2.to_k": "lora"}``."""
    if not text:
        return None
    policy = {}
    for part in text.split(","):
        key, sep, method = part.partition("=")
        if not sep or not key.strip() or not method.strip():
            raise AdapterError(f"policy: expected GROUP=METHOD pairs separated by commas, got {part.strip()!r}")
        policy[key.strip()] = method.strip()
    return policy


def format_policy(policy: Mapping[str, str] | None) -> str | None:
    """The text ``parse_policy`` reads back into ``policy``."""
    return ", ".join(f"{key}={method}" for key, method in policy.items()) if policy else None


@dataclass
class AdapterConfig:
    """What to adapt and how (or, ``method = "full"``, which layers to train themselves). Validated here, once."""

    method: str = "dora"
    """``lora``, ``dora`` (magnitude + LoRA direction), ``magnitude`` (magnitude only, paper §5.6),
    ``dvora`` (magnitude + VeRA direction, paper §5.4), or ``full``: no adapter, the targeted layers
    themselves are trained (``full.py``; the other options below but ``targets`` must keep their defaults)."""
    rank: int = 8
    """LoRA rank ``r`` of the directional update (ignored by ``magnitude`` and ``full``)."""
    alpha: float | None = None
    """LoRA alpha; the update is scaled by ``alpha / rank``. ``None`` means ``alpha = rank`` (scale 1),
    whatever the rank becomes (``dataclasses.replace(config, rank=16)``)."""
    targets: str | Sequence[str] = "attn"
    """A preset (``attn``, ``attn+ff``, ``all-linear``) or explicit whole-name patterns."""
    dropout: float = 0.0
    """Dropout on the adapter input (the base path is never dropped)."""
    norm_grad: str = "detach"
    """DoRA only: ``detach`` treats the row norm as a constant (paper §4.3), ``exact`` keeps its gradient (Eq. 6)."""
    policy: str | Mapping[str, str] | None = None
    """Tuning granularity (paper §5.6): a method per group of targets, e.g. ``{"ff": "magnitude"}`` or
    ``"ff=magnitude"`` (direction and magnitude on attention, magnitude only on feed-forward). Keys: ``attn``,
    ``ff`` or whole-name patterns; the first key that matches a layer wins; other targets use ``method``.
    Held as a dict."""
    memory_saving: bool = True
    """DoRA: for layers whose output only feeds a residual add (``to_out.0``, ``ff.net.2``, ...), recompute
    their output in backward for the magnitude's gradient instead of keeping it: no activation beyond
    LoRA's (measured on CPU medium: +0.3% against +6.8%), for about 4% more step time."""
    vera_seed: int = 0
    """DVoRA only: seed of VeRA's frozen random matrices (stored in the adapter file)."""
    adapter_dtype: str | None = "float32"
    """dtype of the adapter parameters (``float32`` keeps them fp32 under a half-precision base);
    ``None``: the base's."""

    def __post_init__(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise AdapterError(f"method: must be one of {', '.join(TRAIN_METHODS)}, got {self.method!r}")
        if self.method == FULL:
            self._check_full()
        else:
            self._check_adapter()
        if self.adapter_dtype is not None and not isinstance(getattr(torch, self.adapter_dtype, None), torch.dtype):
            raise AdapterError(f"adapter_dtype: not a torch dtype: {self.adapter_dtype!r}")

    def _check_targets(self) -> None:
        if isinstance(self.targets, str):
            if self.targets not in PRESETS and not self.targets.strip():
                raise AdapterError("targets: empty")
        else:
            self.targets = list(self.targets)
            if not self.targets:
                raise AdapterError("targets: empty list")

    def _check_adapter(self) -> None:
        if self.method != "magnitude" and (not isinstance(self.rank, int) or self.rank <= 0):
            raise AdapterError(f"rank: must be a positive integer, got {self.rank!r}")
        alpha = float(self.rank) if self.alpha is None else self.alpha
        if alpha <= 0:
            raise AdapterError(f"alpha: must be positive, got {alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.norm_grad not in ("detach", "exact"):
            raise AdapterError(f"norm_grad: must be 'detach' or 'exact', got {self.norm_grad!r}")
        self._check_targets()
        self.policy = parse_policy(self.policy) if isinstance(self.policy, str) else self.policy
        if self.policy:
            self.policy = dict(self.policy)
            for key, m in self.policy.items():
                if m not in METHODS:
                    raise AdapterError(f"policy: method for {key!r} must be one of {', '.join(METHODS)}, got {m!r}")
            if (
                "dvora" in set(self.policy.values()) | {self.method}
                and len(set(self.policy.values()) | {self.method}) > 1
            ):
                raise AdapterError("policy: DVoRA cannot be mixed with other methods")
        else:
            self.policy = None

    def _check_full(self) -> None:
        """Full fine-tuning has no adapter: refuse the adapter options that would change nothing."""
        if not target_patterns(self.targets):
            raise AdapterError("targets: empty")
        for name, given in (
            ("policy", bool(self.policy)),
            ("dropout", self.dropout != 0.0),
            ("norm_grad", self.norm_grad != "detach"),
        ):
            if given:
                raise AdapterError(
                    f"{name}: an adapter option; method 'full' trains the targeted layers themselves "
                    f"and has no adapter (got {name} = {getattr(self, name)!r})"
                )
        self.policy = None

    @property
    def scale_alpha(self) -> float:
        """The alpha the update is scaled by (``alpha / rank``): ``alpha``, or ``rank`` when it is ``None``."""
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def patterns(self) -> list[str]:
        """The whole-name patterns ``targets`` stands for."""
        return target_patterns(self.targets)

    def method_for(self, name: str) -> str:
        """The method of the layer ``name`` under ``policy``."""
        for key, method in (self.policy or {}).items():
            patterns = POLICY_GROUPS.get(key, (key,))
            if any(name_matches(name, p) for p in patterns):
                return method
        return self.method

    @property
    def torch_adapter_dtype(self) -> torch.dtype | None:
        return None if self.adapter_dtype is None else getattr(torch, self.adapter_dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return d


def name_matches(name: str, pattern: str) -> bool:
    """Whole-name match: ``pattern`` equals ``name`` or a dotted suffix of it (globs allowed)."""
    if pattern == "*":
        return True
    parts = name.split(".")
    depth = pattern.count(".") + 1
    if depth > len(parts):
        return False
    return fnmatch.fnmatchcase(".".join(parts[-depth:]), pattern) or fnmatch.fnmatchcase(name, pattern)


def target_patterns(targets: str | Sequence[str]) -> list[str]:
    """The whole-name patterns a ``targets`` value stands for (a preset, comma-separated names, or a list)."""
    if isinstance(targets, str):
        if targets in PRESETS:
            return list(PRESETS[targets])
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def find_targets(module: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``module`` that ``config`` adapts (sorted as in the model)."""
    return select_targets(module, config.targets, require_match=False)


def select_targets(module: nn.Module, targets: str | Sequence[str], *, require_match: bool = True) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``module`` that ``targets`` names, in the model's order:
    the layers ``add_adapters`` wraps, and the layers full fine-tuning trains.

    ``require_match``: every explicit pattern must match at least one layer (a typo is an error, not a
    no-op); a preset may match nothing in one component (``attn``'s CLIP names in a UNet) but must match
    something.
    """
    patterns = target_patterns(targets)
    is_all = patterns == ["*"]
    names = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear) or isinstance(child, AdapterLinear) or name.endswith(".base"):
            continue
        if is_all and any(name_matches(name, p) for p in ALL_LINEAR_EXCLUDE):
            continue
        if any(name_matches(name, p) for p in patterns):
            names.append(name)
    if require_match:
        if not names:
            raise AdapterError(
                f"targets: {targets!r} matched no nn.Linear in {type(module).__name__} "
                "(patterns match whole dotted names or their dotted suffixes, e.g. 'to_q' or 'attn1.to_out.0')"
            )
        if not isinstance(targets, str) or targets not in PRESETS:
            all_linear = [n for n, c in module.named_modules() if isinstance(c, nn.Linear)]
            for p in patterns:
                if not any(name_matches(n, p) for n in all_linear):
                    raise AdapterError(f"targets: pattern {p!r} matched no nn.Linear in {type(module).__name__}")
    return names


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``root`` (``a.b.c``: ``root.a.b.c = new``)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def make_adapter(base: nn.Linear, config: AdapterConfig, name: str = "", shared: dict | None = None) -> AdapterLinear:
    """Wrap one ``nn.Linear`` as ``config`` says; errors name the module. ``shared``: DVoRA's per-shape matrices."""
    method = config.method_for(name)
    cls = ADAPTER_CLASSES[method]
    kwargs = {
        "rank": config.rank,
        "alpha": config.scale_alpha,
        "dropout": config.dropout,
        "dtype": config.torch_adapter_dtype,
    }
    if method in ("dora", "dvora"):
        kwargs["norm_grad"] = config.norm_grad
    if method == "dvora":
        kwargs.update(seed=config.vera_seed, shared=shared if shared is not None else {})
    try:
        return cls(base, **kwargs)
    except ValueError as e:
        raise AdapterError(f"{name or 'module'}: {e}") from None


def add_adapters(module: nn.Module, config: AdapterConfig, *, require_match: bool = True) -> list[str]:
    """Wrap the target ``nn.Linear`` layers of ``module`` in place; return their names.

    The layers are ``select_targets(module, config.targets)``: every explicit pattern must match at least one
    layer (a typo is an error, not a no-op). Base weights are frozen; only the adapter parameters require grad.
    """
    if config.method == FULL:
        raise AdapterError("method: 'full' trains the targeted layers themselves and has no adapter")
    if any(True for _ in adapter_modules(module)):
        raise AdapterError("this module already has adapters; remove or merge them first")
    names = select_targets(module, config.targets, require_match=require_match)
    # Check every layer before changing anything: a failure leaves the module untouched.
    for name in names:
        if config.method_for(name) != "magnitude":
            layer = module.get_submodule(name)
            if config.rank > min(layer.in_features, layer.out_features):
                raise AdapterError(
                    f"{name}: rank must be in 1..{min(layer.in_features, layer.out_features)} for a "
                    f"Linear({layer.in_features}, {layer.out_features}), got {config.rank}"
                )
    shared: dict = {}  # DVoRA: one frozen (A, B) pair per layer shape
    adapters = {name: make_adapter(module.get_submodule(name), config, name, shared) for name in names}
    for p in module.parameters():
        p.requires_grad_(False)
    for name, adapter in adapters.items():
        if (
            config.memory_saving
            and isinstance(adapter, DoRALinear)
            and any(name_matches(name, t) for t in RESIDUAL_TAILS)
        ):
            adapter.magnitude_grad = "recompute"
        set_submodule(module, name, adapter)
    for _, adapter in adapter_modules(module):
        adapter.base.requires_grad_(False)
    return names


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (what the optimizer gets)."""
    return [p for _, a in adapter_modules(module) for n, p in a.named_parameters() if not n.startswith("base.")]


# State dict: {f"{module_name}.{param}": tensor}, param in lora_A [r, in], lora_B [out, r], magnitude [out].
ADAPTER_PARAMS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "magnitude"),
    "magnitude": ("magnitude",),
    "dora_in": ("lora_A", "lora_B", "magnitude"),  # dora_in: magnitude [in] (files from other tools)
    "dvora": ("vera_d", "vera_b", "magnitude"),
}


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters of ``module``, keyed ``<module name>.<lora_A|lora_B|magnitude>`` (detached copies)."""
    sd = {}
    for name, adapter in adapter_modules(module):
        for p in ADAPTER_PARAMS[adapter.method]:
            sd[f"{name}.{p}"] = getattr(adapter, p).detach().clone()
    return sd


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.{p}": tuple(getattr(adapter, p).shape)
        for name, adapter in adapter_modules(module)
        for p in ADAPTER_PARAMS[adapter.method]
    }


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Raise ``AdapterError`` listing missing, unexpected and mis-shaped keys (nothing is changed)."""
    expected = expected_shapes(module)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise AdapterError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))


@torch.no_grad()
def load_adapter_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Copy ``state_dict`` into ``module``'s adapters; strict on keys and shapes, checked before any write."""
    check_state_dict(module, state_dict, source=source)
    for name, adapter in adapter_modules(module):
        if adapter.merged:
            raise AdapterError(f"{name}: adapter is merged; unmerge before loading weights")
        for p in ADAPTER_PARAMS[adapter.method]:
            getattr(adapter, p).copy_(state_dict[f"{name}.{p}"])


def merge_adapters(module: nn.Module) -> list[str]:
    """Bake every adapter into its base weight and put the plain ``nn.Linear`` back (zero overhead).

    Returns the names of the merged layers. Irreversible: save the adapter first if you need it.
    """
    names = []
    for name, adapter in list(adapter_modules(module)):
        adapter.merge()
        set_submodule(module, name, adapter.base)
        names.append(name)
    return names


@torch.no_grad()
def as_dora(module: nn.Module) -> list[str]:
    """Replace every DVoRA adapter by the equal DoRA one (``A' = diag(d)·A``, ``B' = diag(b)·B``), so
    that files in the diffusers and kohya formats hold it in a layout every DoRA loader reads."""
    names = []
    for name, a in list(adapter_modules(module)):
        if isinstance(a, DVoRALinear):
            d = DoRALinear(a.base, a.rank, a.alpha, dtype=a.vera_d.dtype, norm_grad=a.norm_grad)
            d.lora_A.copy_(a.lora_A)
            d.lora_B.copy_(a.lora_B)
            d.magnitude.copy_(a.magnitude)
            d.scale, d.enabled = a.scale, a.enabled
            set_submodule(module, name, d)
            names.append(name)
    return names


def remove_adapters(module: nn.Module) -> list[str]:
    """Drop every adapter and put the original ``nn.Linear`` back (unmerging first)."""
    names = []
    for name, adapter in list(adapter_modules(module)):
        adapter.unmerge()
        set_submodule(module, name, adapter.base)
        names.append(name)
    return names


def adapter_summary(module: nn.Module) -> dict:
    """Counts for logs: layers adapted, trainable adapter parameters, and both per method."""
    mods = list(adapter_modules(module))
    per: dict[str, dict[str, int]] = {}
    for _, a in mods:
        entry = per.setdefault(a.method, {"layers": 0, "trainable_parameters": 0})
        entry["layers"] += 1
        entry["trainable_parameters"] += sum(p.numel() for n, p in a.named_parameters() if not n.startswith("base."))
    return {
        "layers": len(mods),
        "trainable_parameters": sum(p.numel() for p in adapter_parameters(module)),
        "methods": sorted(per),
        "per_method": per,
    }


__all__ = [
    "AdapterConfig",
    "AdapterError",
    "FULL",
    "METHODS",
    "PRESETS",
    "TRAIN_METHODS",
    "add_adapters",
    "adapter_parameters",
    "adapter_state_dict",
    "check_state_dict",
    "find_targets",
    "format_policy",
    "parse_policy",
    "select_targets",
    "target_patterns",
    "load_adapter_state_dict",
    "merge_adapters",
    "name_matches",
    "remove_adapters",
    "adapter_summary",
    "as_dora",
    "set_submodule",
    "LoRALinear",
    "DoRALinear",
    "DVoRALinear",
    "MagnitudeLinear",
]
