"""Export a trained adapter (diffusers, kohya, comfyui, merged folder, merged single file) and verify a file.

Every export loads the adapter into a fresh base pipeline with our exact loader first, and records
a small fixed-seed PROBE (UNet and text-encoder outputs on fixed inputs) in the adapter file's
metadata. ``verify`` loads a file into a fresh pipeline and checks it reproduces that probe: the way
to tell that a file, a loader and a base model agree.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import runs
from .formats.base import METADATA_KEY, AdapterFileError, components_of
from .formats.comfyui import save_comfyui
from .formats.diffusers import INPUT_AXIS_REFUSAL, save_adapter
from .formats.kohya import save_kohya
from .formats.load import load_adapter, resolve_adapter_file
from .full import FULL, MERGED_FORMATS, FullTuningError, load_full_run
from .inject import as_dora, merge_adapters
from .layers import adapter_modules

FORMATS = ("diffusers", "kohya", "comfyui", "merged-folder", "merged-single")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_outputs(pipe, seed: int = 0) -> dict[str, list[float]]:
    """Outputs of every component on fixed, seeded inputs (small: an 8x8 latent, 8 tokens)."""
    g = torch.Generator("cpu").manual_seed(seed)
    out: dict[str, list[float]] = {}
    comps = components_of(pipe)
    ids = torch.randint(1, 200, (1, 8), generator=g)
    if "unet" in comps:
        unet = comps["unet"]
        cfg = unet.config
        dev, dt = unet.device, unet.dtype
        sample = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
        states = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)
        added = None
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {
                "text_embeds": torch.randn(1, pooled, generator=g).to(dev, dt),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).to(dev, dt),
            }
        y = unet(
            sample.to(dev, dt), torch.tensor([500], device=dev), states.to(dev, dt), added_cond_kwargs=added
        ).sample
        out["unet"] = y.float().flatten()[:: max(1, y.numel() // 64)][:64].cpu().tolist()
    for name in ("text_encoder", "text_encoder_2"):
        if name in comps:
            te = comps[name]
            h = te(ids.to(te.device), output_hidden_states=True).hidden_states[-2]
            out[name] = h.float().flatten()[:: max(1, h.numel() // 64)][:64].cpu().tolist()
    return out


def compare_probes(
    expected: dict[str, list[float]], got: dict[str, list[float]], rtol: float = 1e-4
) -> dict[str, float]:
    """Per component: max |got − expected| / max(1e-6, max |expected|)."""
    errors = {}
    for comp, ref in expected.items():
        if comp not in got:
            errors[comp] = float("inf")
            continue
        a, b = torch.tensor(got[comp]), torch.tensor(ref)
        errors[comp] = float((a - b).abs().max() / max(1e-6, float(b.abs().max())))
    return errors


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _atomic_folder(final: Path):
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would stay on the exported folder
    return tmp


def export_adapter(
    adapter: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Export the adapter of a run folder or file to ``out`` in ``format`` (see ``FORMATS``). A full
    fine-tuning run (or one of its checkpoints) has no adapter: it exports as a merged pipeline only.

    ``model``: the base model (default: the one the run was trained on). ``dtype``: of merged exports.
    Nothing at ``out`` is replaced unless ``overwrite``; every write is atomic.
    """
    from .models import load_pipeline

    if format not in FORMATS:
        raise AdapterFileError(f"format: must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise AdapterFileError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    full = runs.recorded_method(adapter) == FULL  # no adapter: its tuned components, merged formats only
    if full and format not in MERGED_FORMATS:
        raise FullTuningError(
            f"{adapter}: a full fine-tuning run (method {FULL!r}) has no adapter to write as {format}; "
            f"export it as {' or '.join(MERGED_FORMATS)} (the base pipeline with its tuned components)"
        )
    out = Path(out)
    if format == "merged-single" and out.suffix != ".safetensors":
        out = out / "model.safetensors"
    if format in ("kohya", "comfyui") and out.suffix != ".safetensors":
        out = out / f"adapter_{format}.safetensors"
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite and format != "diffusers":
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    model = model if model is not None else runs.base_model(adapter)
    if full:
        pipe = load_pipeline(model)
        return _write_merged(pipe, format, out, dtype, adapter, load_full_run(pipe, adapter))
    pipe = load_pipeline(model)
    report = load_adapter(pipe, adapter)
    if format == "diffusers" and any(
        a.method == "dora_in" for m in components_of(pipe).values() for _, a in adapter_modules(m)
    ):
        raise AdapterFileError(INPUT_AXIS_REFUSAL.format(where=str(adapter)))
    metadata = {"base_model": runs.model_record(model), "source": str(Path(adapter)), "probe": probe_outputs(pipe)}
    if format == "diffusers":
        for module in components_of(pipe).values():
            as_dora(module)  # DVoRA as the equal DoRA: a layout diffusers and PEFT read
        return save_adapter(pipe, out, metadata=metadata, overwrite=overwrite)
    if format == "kohya":
        return save_kohya(pipe, out, metadata=metadata, overwrite=overwrite)
    if format == "comfyui":  # dora_scale from this base model's W0 (see formats/comfyui.py)
        return save_comfyui(pipe, out, metadata=metadata, overwrite=overwrite)
    # merged: bake the adapters in, then write the base model's layout
    for module in components_of(pipe).values():
        merge_adapters(module)
    return _write_merged(pipe, format, out, dtype, adapter, report.layers)


def _write_merged(pipe, format: str, out: Path, dtype: str, adapter, layers: dict[str, int]) -> Path:
    """A merged pipeline (adapters baked in, or a full run's tuned components) as ``format`` at ``out``."""
    pipe.to(dtype=DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "merged-single":
        from .formats.original import save_original_sdxl

        return save_original_sdxl(
            pipe, out, metadata={METADATA_KEY: json.dumps({"merged_from": str(adapter), "layers": layers})}
        )
    tmp = _atomic_folder(out)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    file: str
    model: str | None
    loader: str
    errors: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.errors) and all(e <= self.tolerance for e in self.errors.values())

    def __str__(self) -> str:
        lines = [f"{self.file} on {runs.model_record(self.model)} with the {self.loader} loader:"]
        for comp, e in self.errors.items():
            lines.append(f"  {comp:15s} max relative error {e:.2e}  {'ok' if e <= self.tolerance else 'MISMATCH'}")
        lines.append("reproduces its recorded outputs" if self.ok else "does NOT reproduce its recorded outputs")
        return "\n".join(lines)


def verify_adapter(
    adapter: str | os.PathLike, model: str | None = None, *, loader: str = "ours", tolerance: float = 1e-4
) -> VerifyReport:
    """Load ``adapter`` into a fresh pipeline of ``model`` and compare against the probe in its metadata.

    ``loader``: ``ours`` (``load_adapter``) or ``diffusers`` (``pipe.load_lora_weights``).
    """
    from .models import load_pipeline

    file = resolve_adapter_file(adapter)
    recorded = runs.adapter_metadata(file).get("probe")
    if not recorded:
        raise AdapterFileError(f"{file}: has no recorded probe; export it with `dora-diffusion export` to add one")
    if model is None:
        model = runs.base_model(file)
    pipe = load_pipeline(model)
    if loader == "ours":
        load_adapter(pipe, file)
    elif loader == "diffusers":
        try:
            pipe.load_lora_weights(str(file))
        except Exception as e:  # raised deep inside diffusers/PEFT: one line, as our loader gives
            detail = " ".join(str(e).split())
            detail = detail if len(detail) <= 300 else detail[:300] + "..."
            raise AdapterFileError(
                f"{file}: diffusers' load_lora_weights could not load it ({type(e).__name__}: {detail})"
            ) from None
    else:
        raise AdapterFileError(f"loader: must be 'ours' or 'diffusers', got {loader!r}")
    return VerifyReport(str(file), model, loader, compare_probes(recorded, probe_outputs(pipe)), tolerance)
