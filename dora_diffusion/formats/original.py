"""The original SDXL single-file checkpoint: the whole pipeline as one state dict, written.

Stability's ``sd_xl_base_1.0.safetensors`` (and what ComfyUI, A1111/Forge and
``StableDiffusionXLPipeline.from_single_file`` read) holds the whole pipeline in one state dict,
under four prefixes:

    model.diffusion_model.                  the UNet, SGM/LDM names (``input_blocks.4.1.transformer_blocks...``)
    first_stage_model.                      the VAE, LDM names (``encoder.down.0.block.1.conv1``, ``decoder.up.3...``)
    conditioner.embedders.0.transformer.    text_encoder: Hugging Face CLIP names, with the ``text_model.`` level
    conditioner.embedders.1.model.          text_encoder_2: OpenCLIP names (``transformer.resblocks.N.attn.in_proj_*``)

The UNet's and the VAE's names are ``sgm_names``'. The text encoders' follow diffusers'
``convert_ldm_clip_checkpoint`` (text_encoder: only the prefix) and ``convert_open_clip_checkpoint``
(text_encoder_2: q/k/v fused into ``in_proj_weight``/``in_proj_bias`` in that order, ``text_projection``
stored transposed, used as ``x @ text_projection``), in reverse.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import AdapterError
from ..layers import AdapterLinear
from .base import components_of, save_safetensors_atomic
from .sgm_names import (
    CLIP_L_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_UNET_LAYOUT,
    SDXL_VAE_LAYOUT,
    UNET_PREFIX,
    VAE_PREFIX,
    OriginalFormatError,
    diffusers_unet_name,
    ldm_vae_name,
    sgm_unet_name,
    unet_name_table,
    vae_name_table,
)

__all__ = [
    "CLIP_L_PREFIX",
    "OPEN_CLIP_PREFIX",
    "SDXL_UNET_LAYOUT",
    "SDXL_VAE_LAYOUT",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "OriginalFormatError",
    "diffusers_unet_name",
    "ldm_vae_name",
    "save_original_sdxl",
    "sgm_unet_name",
    "to_original_sdxl",
]

POSITION_IDS_KEY = CLIP_L_PREFIX + "text_model.embeddings.position_ids"
LOGIT_SCALE_KEY = OPEN_CLIP_PREFIX + "logit_scale"
LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained temperature, as in sd_xl_base_1.0 (4.6055 in fp16)


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
    table = unet_name_table(unet)
    out = {}
    for name, tensor in unet.state_dict().items():
        out[UNET_PREFIX + table._lookup(table.forward, name, "UNet", "SGM")] = tensor
    return out


def _vae_state(vae: nn.Module) -> dict[str, torch.Tensor]:
    table = vae_name_table(vae)
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
