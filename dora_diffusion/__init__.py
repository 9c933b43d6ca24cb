"""dora-diffusion: personalise Stable Diffusion XL with DoRA, LoRA beside it as the baseline.

from dora_diffusion import AdapterConfig, add_adapters, load_adapter, save_adapter, merge_adapters
"""

from .formats import AdapterFileError, LoadReport, load_adapter, save_adapter, unload_adapter
from .inject import (
    AdapterConfig,
    AdapterError,
    adapter_parameters,
    adapter_state_dict,
    add_adapters,
    load_adapter_state_dict,
    merge_adapters,
    remove_adapters,
)
from .layers import DoRALinear, LoRALinear, MagnitudeLinear, disable_adapters, set_adapter_scale

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "LoadReport",
    "DoRALinear",
    "LoRALinear",
    "MagnitudeLinear",
    "add_adapters",
    "adapter_parameters",
    "adapter_state_dict",
    "disable_adapters",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_adapters",
    "remove_adapters",
    "save_adapter",
    "set_adapter_scale",
    "unload_adapter",
]
