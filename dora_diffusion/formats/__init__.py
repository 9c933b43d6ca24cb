"""Adapter file formats: one module each, over a shared ``base``, read through one dispatch (``load``).

- ``diffusers``: the PEFT key format that ``pipe.load_lora_weights`` reads (``save_adapter`` writes it);
- ``kohya``: LyCORIS / sd-scripts keys, every DoRA axis read exactly (``save_kohya``);
- ``comfyui``: the kohya file with a ``dora_scale`` exact in ComfyUI and Forge (``save_comfyui``);
- ``original``: the original SDXL single-file checkpoint layout and SGM names (``save_original_sdxl``);
- ``load``: ``load_adapter`` / ``read_adapter_file`` for a file of any of them.
"""

from .base import AdapterFileError, LoadReport, components_of
from .comfyui import save_comfyui
from .diffusers import WEIGHT_NAME, save_adapter
from .kohya import save_kohya
from .load import load_adapter, read_adapter_file, resolve_adapter_file, unload_adapter
from .original import save_original_sdxl

__all__ = [
    "WEIGHT_NAME",
    "AdapterFileError",
    "LoadReport",
    "components_of",
    "load_adapter",
    "read_adapter_file",
    "resolve_adapter_file",
    "save_adapter",
    "save_comfyui",
    "save_kohya",
    "save_original_sdxl",
    "unload_adapter",
]
