"""The original SDXL single-file checkpoint layout, and SGM module names.

Stability's ``sd_xl_base_1.0.safetensors`` (and what ComfyUI, A1111/Forge and
``StableDiffusionXLPipeline.from_single_file`` read) holds the whole pipeline in one state dict,
under four prefixes:

    model.diffusion_model.                  the UNet, SGM/LDM names (``input_blocks.4.1.transformer_blocks...``)
    first_stage_model.                      the VAE, LDM names (``encoder.down.0.block.1.conv1``, ``decoder.up.3...``)
    conditioner.embedders.0.transformer.    text_encoder: Hugging Face CLIP names, with the ``text_model.`` level
    conditioner.embedders.1.model.          text_encoder_2: OpenCLIP names (``transformer.resblocks.N.attn.in_proj_*``)

Where the mapping comes from: it is the reverse of diffusers' single-file loader
(``diffusers/loaders/single_file_utils.py``): ``convert_ldm_unet_checkpoint`` (UNet blocks:
``input_blocks.{1 + b*(layers+1) + j}.0`` <- ``down_blocks.b.resnets.j``, ``.1`` <- ``attentions.j``,
``input_blocks.{...}.0.op`` <- downsamplers; ``middle_block.{0,1,2}``; ``output_blocks.{b*(layers+1) + j}``
and the upsampler at ``.1.conv`` or, after an attention, ``.2.conv``; the resnet renames of
``update_unet_resnet_ldm_to_diffusers``; the fixed names of ``DIFFUSERS_TO_LDM_MAPPING["unet"]``),
``convert_ldm_vae_checkpoint`` (decoder ``up`` levels numbered in reverse, ``mid.block_1/2``,
``mid.attn_1`` with 1x1-conv q/k/v/proj_out, ``nin_shortcut``), ``convert_ldm_clip_checkpoint``
(text_encoder: only the prefix) and ``convert_open_clip_checkpoint`` (text_encoder_2: q/k/v fused into
``in_proj_weight``/``in_proj_bias`` in that order, ``text_projection`` stored transposed, used as
``x @ text_projection``). The code here is written from those rules, driven by the models' configs
(block types, ``layers_per_block``), with SDXL base 1.0's layout as the default; the tests check it
against diffusers' converters in the loading direction, on the tiny model and on the real SDXL config.

Two tensors of the original file are not weights of the diffusers components; they are written too, so
the key set is the original one (2515 tensors for SDXL base 1.0):
``conditioner.embedders.0.transformer.text_model.embeddings.position_ids`` (int64 ``arange``; some tools
treat a checkpoint without it as broken) and ``conditioner.embedders.1.model.logit_scale`` (OpenCLIP's
contrastive temperature, ``ln(100)``, unused for text encoding). diffusers ignores both when loading.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import AdapterError
from ..layers import AdapterLinear
from .base import components_of, save_safetensors_atomic

__all__ = [
    "CLIP_L_PREFIX",
    "OPEN_CLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "OriginalFormatError",
    "diffusers_unet_name",
    "ldm_vae_name",
    "save_original_sdxl",
    "sgm_unet_name",
    "to_original_sdxl",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.<HF CLIP name>
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

POSITION_IDS_KEY = CLIP_L_PREFIX + "text_model.embeddings.position_ids"
LOGIT_SCALE_KEY = OPEN_CLIP_PREFIX + "logit_scale"
LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained temperature, as in sd_xl_base_1.0 (4.6055 in fp16)

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


def _unet_table_for(config: Any) -> _NameTable:
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
    table = _unet_table_for(config)
    return table._lookup(table.forward, diffusers_name, "UNet", "SGM")


def diffusers_unet_name(sgm_name: str, config: Any = None) -> str:
    """The diffusers UNet name of an SGM/LDM name (the inverse of :func:`sgm_unet_name`).

    A leading ``model.diffusion_model.`` is accepted and removed.
    """
    table = _unet_table_for(config)
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


def _vae_table_for(config: Any) -> _NameTable:
    layout = _layout_of(config, SDXL_VAE_LAYOUT)
    num_blocks = len(layout["down_block_types"])
    if len(layout["up_block_types"]) != num_blocks:
        raise OriginalFormatError("VAE has different numbers of down and up blocks; LDM needs them mirrored.")
    return _vae_table(num_blocks, int(layout["layers_per_block"]))


def ldm_vae_name(diffusers_name: str, config: Any = None) -> str:
    """The LDM name (``first_stage_model.`` key without that prefix) of a diffusers ``AutoencoderKL``
    module or parameter name, e.g. ``decoder.up_blocks.0.resnets.2.conv1`` -> ``decoder.up.3.block.2.conv1``.
    ``config``: the VAE's config or the model; ``None`` means SDXL's 4-level VAE."""
    table = _vae_table_for(config)
    return table._lookup(table.forward, diffusers_name, "VAE", "LDM")


# --------------------------------------------------------------------------------------------
# The whole checkpoint
# --------------------------------------------------------------------------------------------

CHECKPOINT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _components(pipe_or_components: Any) -> dict[str, nn.Module]:
    try:
        found = components_of(pipe_or_components, CHECKPOINT_COMPONENTS)
    except AdapterError as e:
        raise OriginalFormatError(f"An original SDXL checkpoint: {e}.") from None
    missing = [name for name in CHECKPOINT_COMPONENTS if name not in found]
    if missing:
        raise OriginalFormatError(
            "An original SDXL checkpoint needs unet, vae, text_encoder and text_encoder_2; "
            f"missing: {', '.join(missing)}."
        )
    for name, module in found.items():
        for module_name, sub in module.named_modules():
            # our adapters (AdapterLinear: a ``base`` layer plus A/B/magnitude) and PEFT's (``base_layer``)
            if hasattr(sub, "base_layer") or isinstance(sub, AdapterLinear):
                raise OriginalFormatError(
                    f"{name}.{module_name} is an unmerged adapter layer ({type(sub).__name__}); merge the adapters "
                    "into the base weights (merge_adapters) before writing a single-file checkpoint."
                )
    return {name: found[name] for name in CHECKPOINT_COMPONENTS}


def _unet_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    table = _unet_table_for(unet)
    out = {}
    for name, tensor in unet.state_dict().items():
        out[UNET_PREFIX + table._lookup(table.forward, name, "UNet", "SGM")] = tensor
    return out


def _vae_state(vae: nn.Module) -> dict[str, torch.Tensor]:
    table = _vae_table_for(vae)
    out = {}
    for name, tensor in vae.state_dict().items():
        key = table._lookup(table.forward, name, "VAE", "LDM")
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[VAE_PREFIX + key] = tensor
    return out


def _clip_l_state(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """text_encoder: Hugging Face names with the ``text_model.`` level (transformers 5's CLIPTextModel
    dropped it from its own names), plus ``position_ids`` as the original has it."""
    out = {}
    for name, tensor in text_encoder.state_dict().items():
        if not name.startswith(("text_model.", "text_projection.")):
            name = "text_model." + name
        out[CLIP_L_PREFIX + name] = tensor
    if POSITION_IDS_KEY not in out:
        positions = text_encoder.config.max_position_embeddings
        out[POSITION_IDS_KEY] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    return out


_OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _open_clip_state(text_encoder_2: nn.Module) -> dict[str, torch.Tensor]:
    """text_encoder_2 (CLIPTextModelWithProjection) in OpenCLIP's layout."""
    state = {
        (name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name): tensor
        for name, tensor in text_encoder_2.state_dict().items()
    }
    state.pop("text_model.embeddings.position_ids", None)  # a buffer OpenCLIP does not have
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[name]] = tensor
            continue
        if name == "text_projection.weight":  # Linear [proj, hidden] -> matrix [hidden, proj], x @ P
            out["text_projection"] = tensor.t().contiguous()
            continue
        match = _LAYER_KEY.fullmatch(name)
        if match is None:
            raise OriginalFormatError(f"text_encoder_2 parameter {name!r} has no place in the OpenCLIP layout.")
        layer, part, kind = match.groups()
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[part[-6]] = tensor
        elif part in _OPEN_CLIP_LAYER_PARTS:
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_PARTS[part]}.{kind}"] = tensor
        else:
            raise OriginalFormatError(f"text_encoder_2 parameter {name!r} has no place in the OpenCLIP layout.")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise OriginalFormatError(f"text_encoder_2 layer {layer} lacks one of q/k/v_proj.{kind}.")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if "text_projection" not in out:
        raise OriginalFormatError(
            "text_encoder_2 has no text_projection: SDXL's second encoder is CLIPTextModelWithProjection."
        )
    dtype = out["text_projection"].dtype
    out["logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=dtype, device=out["text_projection"].device)
    return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in out.items()}


def to_original_sdxl(pipe_or_components: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline as one state dict in the original SDXL checkpoint layout (see the module docstring).

    ``pipe_or_components``: a ``StableDiffusionXLPipeline`` or a mapping with ``unet``, ``vae``,
    ``text_encoder`` and ``text_encoder_2``. Adapters must be merged first (an unmerged adapter layer raises
    ``OriginalFormatError``). Tensors are detached and, where no copy is needed, share memory with the
    models; ``dtype`` casts the floating-point ones (``position_ids`` stays int64).
    """
    found = _components(pipe_or_components)
    state: dict[str, torch.Tensor] = {}
    for part in (
        _unet_state(found["unet"]),
        _vae_state(found["vae"]),
        _clip_l_state(found["text_encoder"]),
        _open_clip_state(found["text_encoder_2"]),
    ):
        state.update(part)
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor
    return out


def save_original_sdxl(
    pipe: Any,
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the pipeline as one original-layout ``.safetensors`` checkpoint at ``path`` and return the path.

    Written to a temporary file next to ``path`` and renamed into place, so a failure leaves any file
    already at ``path`` as it was. ``metadata`` values that are not strings are stored as JSON.
    """
    target = Path(path).expanduser()
    if target.suffix != ".safetensors":
        raise OriginalFormatError(f"{target}: a single-file checkpoint is written as .safetensors only.")
    if target.is_dir():
        raise OriginalFormatError(f"{target} is a folder; give the checkpoint's file name.")
    header = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    state = {key: tensor.to("cpu").contiguous() for key, tensor in to_original_sdxl(pipe, dtype=dtype).items()}
    save_safetensors_atomic(state, target, header)
    return target
