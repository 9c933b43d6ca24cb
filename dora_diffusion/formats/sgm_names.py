"""SGM and LDM module names: where each diffusers UNet and VAE name sits in the original SDXL checkpoint.

The original single-file checkpoint (``original``) holds the UNet under ``model.diffusion_model.`` with
SGM/LDM names (``input_blocks.4.1.transformer_blocks...``) and the VAE under ``first_stage_model.`` with
LDM names (``encoder.down.0.block.1.conv1``, ``decoder.up.3...``).

Where the mapping comes from: it is the reverse of diffusers' single-file loader
(``diffusers/loaders/single_file_utils.py``): ``convert_ldm_unet_checkpoint`` (UNet blocks:
``input_blocks.{1 + b*(layers+1) + j}.0`` <- ``down_blocks.b.resnets.j``, ``.1`` <- ``attentions.j``,
``input_blocks.{...}.0.op`` <- downsamplers; ``middle_block.{0,1,2}``; ``output_blocks.{b*(layers+1) + j}``
and the upsampler at ``.1.conv`` or, after an attention, ``.2.conv``; the resnet renames of
``update_unet_resnet_ldm_to_diffusers``; the fixed names of ``DIFFUSERS_TO_LDM_MAPPING["unet"]``) and
``convert_ldm_vae_checkpoint`` (decoder ``up`` levels numbered in reverse, ``mid.block_1/2``,
``mid.attn_1`` with 1x1-conv q/k/v/proj_out, ``nin_shortcut``). The code here is written from those rules,
driven by the models' configs (block types, ``layers_per_block``), with SDXL base 1.0's layout as the
default; the tests check it against diffusers' converters in the loading direction, on the tiny model and
on the real SDXL config.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.<HF CLIP name>
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# SDXL base 1.0's UNet layout (shared/sdxl/unet_config.json): what the name mapping assumes by default.
SDXL_UNET_LAYOUT: dict[str, Any] = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "addition_embed_type": "text_time",
    "class_embed_type": None,
}
# SDXL's VAE: 4 encoder/decoder levels, 2 resnets per encoder level (3 per decoder level).
SDXL_VAE_LAYOUT: dict[str, Any] = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
}


class OriginalFormatError(ValueError):
    """A name or a model that has no place in the original SDXL checkpoint layout."""


# --------------------------------------------------------------------------------------------
# UNet: diffusers <-> SGM names
# --------------------------------------------------------------------------------------------

# diffusers ResnetBlock2D part -> SGM ResBlock part (in_layers = [GroupNorm, SiLU, conv],
# emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, conv])
_UNET_RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
# diffusers VAE ResnetBlock2D part -> LDM VAE ResnetBlock part
_VAE_RESNET_PARTS = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("conv_shortcut", "nin_shortcut"),
)
# diffusers VAE Attention part -> LDM AttnBlock part (q/k/v/proj_out are 1x1 convs there)
_VAE_ATTENTION_PARTS = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)

# An entry: (diffusers prefix, original prefix, inner part renames or None for "unchanged").
_Entry = tuple[str, str, "tuple[tuple[str, str], ...] | None"]


class _NameTable:
    """Prefix table between two naming schemes; the longest matching prefix wins, at a dot boundary."""

    def __init__(self, entries: list[_Entry], what: str):
        self.what = what
        self.forward = {d: (o, parts) for d, o, parts in entries}
        self.backward = {o: (d, tuple((b, a) for a, b in parts) if parts else None) for d, o, parts in entries}
        if len(self.forward) != len(entries) or len(self.backward) != len(entries):
            raise AssertionError(f"{what}: the name table is not one-to-one")

    @staticmethod
    def _lookup(table: dict, name: str, what: str, direction: str) -> str:
        pieces = name.split(".")
        for end in range(len(pieces), 0, -1):
            prefix = ".".join(pieces[:end])
            if prefix not in table:
                continue
            target, parts = table[prefix]
            rest = ".".join(pieces[end:])
            if parts is not None and rest:
                for src, dst in parts:
                    if rest == src or rest.startswith(src + "."):
                        rest = dst + rest[len(src) :]
                        break
                else:
                    raise OriginalFormatError(
                        f"{what} name {name!r} has no {direction} equivalent: {rest!r} is not a part of "
                        f"{prefix!r} (known: {', '.join(src for src, _ in parts)})."
                    )
            return f"{target}.{rest}" if rest else target
        raise OriginalFormatError(f"{what} name {name!r} has no {direction} equivalent for this model's layout.")


def _layout_of(config: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The layout fields of a config dict / FrozenDict / model (``.config``), defaults for missing ones."""
    if config is None:
        return dict(defaults)
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    out = {}
    for key, default in defaults.items():
        value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _per_block(value: int | tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise OriginalFormatError(f"{what} has {len(value)} entries for {n} blocks.")
    return tuple(int(v) for v in value)


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


@lru_cache(maxsize=16)
def _unet_table(
    down: tuple, up: tuple, mid: str | None, layers: Any, addition: str | None, klass: str | None
) -> _NameTable:
    entries: list[_Entry] = [
        ("conv_in", "input_blocks.0.0", None),
        ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None),
        ("conv_norm_out", "out.0", None),
        ("conv_out", "out.2", None),
    ]
    # SGM's label_emb = Sequential(Sequential(Linear, SiLU, Linear)) holds either embedding.
    if addition == "text_time":
        entries += [
            ("add_embedding.linear_1", "label_emb.0.0", None),
            ("add_embedding.linear_2", "label_emb.0.2", None),
        ]
    elif klass in ("timestep", "projection"):
        entries += [
            ("class_embedding.linear_1", "label_emb.0.0", None),
            ("class_embedding.linear_2", "label_emb.0.2", None),
        ]

    n = len(down)
    if len(up) != n:
        raise OriginalFormatError(f"UNet has {n} down blocks and {len(up)} up blocks; SGM needs them mirrored.")
    per_block = _per_block(layers, n, "layers_per_block")

    index = 1  # input_blocks.0 is conv_in
    for b, block_type in enumerate(down):
        for j in range(per_block[b]):
            entries.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET_PARTS))
            if _has_attention(block_type):
                entries.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", None))
            index += 1
        if b < n - 1:  # diffusers: add_downsample = not is_final_block
            entries.append((f"down_blocks.{b}.downsamplers.0", f"input_blocks.{index}.0", None))
            entries.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", None))
            index += 1

    if mid is not None:
        # SGM middle_block = [ResBlock, SpatialTransformer, ResBlock]: resnets.k -> 2k, attentions.k -> 2k + 1
        entries.append(("mid_block.resnets.0", "middle_block.0", _UNET_RESNET_PARTS))
        entries.append(("mid_block.attentions.0", "middle_block.1", None))
        entries.append(("mid_block.resnets.1", "middle_block.2", _UNET_RESNET_PARTS))

    index = 0
    up_layers = tuple(reversed(per_block))
    for b, block_type in enumerate(up):
        count = up_layers[b] + 1
        for j in range(count):
            entries.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET_PARTS))
            if _has_attention(block_type):
                entries.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", None))
            index += 1
        if b < n - 1:  # the upsampler sits in the block's last output block, after its attention if any
            slot = 2 if _has_attention(block_type) else 1
            entries.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{index - 1}.{slot}", None))
    return _NameTable(entries, "UNet")


def unet_name_table(config: Any) -> _NameTable:
    layout = _layout_of(config, SDXL_UNET_LAYOUT)
    return _unet_table(
        tuple(layout["down_block_types"]),
        tuple(layout["up_block_types"]),
        layout["mid_block_type"],
        layout["layers_per_block"],
        layout["addition_embed_type"],
        layout["class_embed_type"],
    )


def sgm_unet_name(diffusers_name: str, config: Any = None) -> str:
    """The SGM/LDM name (the ``model.diffusion_model.`` key without that prefix) of a diffusers UNet
    module or parameter name: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.

    ``config``: the UNet's config (a dict, its ``FrozenDict`` or the model itself); ``None`` means SDXL
    base 1.0's layout. Raises ``OriginalFormatError`` for a name with no SGM equivalent.
    """
    table = unet_name_table(config)
    return table._lookup(table.forward, diffusers_name, "UNet", "SGM")


def diffusers_unet_name(sgm_name: str, config: Any = None) -> str:
    """The diffusers UNet name of an SGM/LDM name (the inverse of :func:`sgm_unet_name`).

    A leading ``model.diffusion_model.`` is accepted and removed.
    """
    table = unet_name_table(config)
    return table._lookup(table.backward, sgm_name.removeprefix(UNET_PREFIX), "SGM UNet", "diffusers")


# --------------------------------------------------------------------------------------------
# VAE: diffusers <-> LDM names
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _vae_table(num_blocks: int, layers: int) -> _NameTable:
    entries: list[_Entry] = []
    for coder in ("encoder", "decoder"):
        for part in ("conv_in", "conv_out"):
            entries.append((f"{coder}.{part}", f"{coder}.{part}", None))
        entries.append((f"{coder}.conv_norm_out", f"{coder}.norm_out", None))
        for k in range(2):
            entries.append((f"{coder}.mid_block.resnets.{k}", f"{coder}.mid.block_{k + 1}", _VAE_RESNET_PARTS))
        entries.append((f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", _VAE_ATTENTION_PARTS))
    for part in ("quant_conv", "post_quant_conv"):
        entries.append((part, part, None))
    for i in range(num_blocks):
        for j in range(layers):
            entries.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET_PARTS))
        if i < num_blocks - 1:
            entries.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", None))
    for i in range(num_blocks):
        level = num_blocks - 1 - i  # LDM numbers decoder levels from the output side
        for j in range(layers + 1):
            entries.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET_PARTS))
        if i < num_blocks - 1:
            entries.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{level}.upsample", None))
    return _NameTable(entries, "VAE")


def vae_name_table(config: Any) -> _NameTable:
    layout = _layout_of(config, SDXL_VAE_LAYOUT)
    num_blocks = len(layout["down_block_types"])
    if len(layout["up_block_types"]) != num_blocks:
        raise OriginalFormatError("VAE has different numbers of down and up blocks; LDM needs them mirrored.")
    return _vae_table(num_blocks, int(layout["layers_per_block"]))


def ldm_vae_name(diffusers_name: str, config: Any = None) -> str:
    """The LDM name (``first_stage_model.`` key without that prefix) of a diffusers ``AutoencoderKL``
    module or parameter name, e.g. ``decoder.up_blocks.0.resnets.2.conv1`` -> ``decoder.up.3.block.2.conv1``.
    ``config``: the VAE's config or the model; ``None`` means SDXL's 4-level VAE."""
    table = vae_name_table(config)
    return table._lookup(table.forward, diffusers_name, "VAE", "LDM")
