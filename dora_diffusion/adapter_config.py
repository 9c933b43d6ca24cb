"""``AdapterConfig``: what to adapt and how, each option checked once, here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .targets import POLICY_GROUPS, PRESETS, AdapterError, name_matches, target_patterns

METHODS = ("lora", "dora", "magnitude", "dvora")
FULL = "full"  # no adapter: the targeted layers themselves are trained (full.py)
TRAIN_METHODS = (*METHODS, FULL)


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
