"""Which layers an adapter goes on: presets, whole-name matching, selecting the ``nn.Linear`` layers.

Target patterns are matched on WHOLE dotted module names, never on substrings: a pattern matches
a module when it equals the name or a dotted suffix of it (``to_q`` matches
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, never ``to_qkv`` or
``add_k_proj``). ``*`` and ``?`` work within the pattern (``attn1.to_*``, ``down_blocks.*.to_q``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from .layers import AdapterLinear

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
