"""Adapter file formats. ``diffusers``: the PEFT key format that ``pipe.load_lora_weights`` reads."""

from .diffusers import (
    AdapterFileError,
    LoadReport,
    load_adapter,
    read_adapter_file,
    save_adapter,
    unload_adapter,
)

__all__ = ["AdapterFileError", "LoadReport", "load_adapter", "read_adapter_file", "save_adapter", "unload_adapter"]
