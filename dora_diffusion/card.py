"""The model card (README.md) written next to a trained adapter, in the Hugging Face convention."""

from __future__ import annotations

from pathlib import Path

from . import runs
from .config import TrainConfig
from .full import FULL


def _front_matter(config: TrainConfig, tag: str) -> str:
    """The Hugging Face YAML header (``base_model`` only for a hub id)."""
    hub_base = config.model if config.model and not Path(config.model).exists() else None
    yaml_base = f"base_model: {hub_base}\n" if hub_base else ""
    return f"""---
{yaml_base}library_name: diffusers
license: other
tags:
- text-to-image
- stable-diffusion-xl
- diffusers
- {tag}
- dora-diffusion
instance_prompt: {config.prompt!r}
---"""


def _training_rows(config: TrainConfig, resolution: int, trainable_parameters: int) -> str:
    """The table rows every card has, after its method row(s)."""
    steps = f"{config.max_steps} / {config.batch_size}×{config.gradient_accumulation}"
    return f"""| targets | `{config.adapter.targets}`{" + both text encoders" if config.train_text_encoder else ""} |
| trainable parameters | {trainable_parameters:,} |
| steps / batch / lr | {steps} / {config.learning_rate:g} ({config.lr_schedule}) |
| resolution | {resolution} |
| prior preservation | {repr(config.class_prompt) if config.class_prompt else "off"} |
| seed | {config.seed} |

Instance prompt: `{config.prompt}`. Validation prompt: `{config.validation_prompt or config.prompt}`."""


def _gallery(config: TrainConfig, images: list[Path], output: Path) -> str:
    shown = images[-config.num_validation_images :] if images else []
    return "\n".join(f"![validation]({p.relative_to(output).as_posix()})" for p in shown)


BASE_LABEL = "tiny-sdxl (the embedded test model of dora-diffusion)"


def model_card(
    config: TrainConfig, *, resolution: int, trainable_parameters: int, images: list[Path], output: Path
) -> str:
    if config.adapter.method == FULL:
        return full_model_card(
            config, resolution=resolution, trainable_parameters=trainable_parameters, images=images, output=output
        )
    base = config.model or BASE_LABEL
    method = {"lora": "LoRA", "dora": "DoRA", "magnitude": "DoRA magnitude-only", "dvora": "DVoRA (DoRA + VeRA)"}.get(
        config.adapter.method, config.adapter.method
    )
    gallery = _gallery(config, images, output)
    load_from = config.model or "PATH/TO/BASE/MODEL"
    comfyui = runs.comfyui_file(output).relative_to(output).as_posix()
    return f"""{_front_matter(config, config.adapter.method)}

# {method} adapter for SDXL: `{config.prompt}`

Trained with [dora-diffusion](https://pypi.org/project/dora-diffusion/) on {base}.

| | |
|---|---|
| method | {method} (`{config.adapter.method}`) |
| rank / alpha | {config.adapter.rank} / {config.adapter.alpha if config.adapter.alpha is not None else config.adapter.rank} |
{_training_rows(config, resolution, trainable_parameters)}

{gallery}

## Use it with diffusers

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{load_from}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{output.name}")  # this folder: {runs.ADAPTER_NAME}
image = pipe("{config.validation_prompt or config.prompt}", num_inference_steps=30).images[0]
```

Or with dora-diffusion, which loads every component exactly (also the text-encoder DoRA magnitudes):

```python
from dora_diffusion import load_adapter
load_adapter(pipe, "{output.name}", scale=1.0)
```

## Which file goes into which tool

| tool | file |
|---|---|
| diffusers, dora-diffusion | `{runs.ADAPTER_NAME}` (this folder, as above) |
| ComfyUI, Forge | `{comfyui}`: DoRA magnitudes written for their formula, which divides by the base weight's norm (if ComfyUI merges its fix, Comfy-Org/ComfyUI#15458, use the kohya file there) |
| LyCORIS, sd-scripts | `dora-diffusion export --adapter {output.name} --format kohya --out {output.name}_kohya.safetensors` |
| A1111 | the merged checkpoint: `dora-diffusion export --adapter {output.name} --format merged-single --out {output.name}_sdxl.safetensors` |

diffusers, ComfyUI and LyCORIS load these files exactly in dora-diffusion's test suite, run with their own
code. Forge applies DoRA with ComfyUI's formula (read from its code, not run). A1111 is not run either: by its
code its DoRA normalises per input column only, so no output-axis DoRA file is exact there, and a merged checkpoint
has no adapter to misread. The ComfyUI/Forge file is exact on the base weights it was computed from (this run's).

`{runs.CONFIG_NAME}` holds every option of this run.
"""


def full_model_card(
    config: TrainConfig, *, resolution: int, trainable_parameters: int, images: list[Path], output: Path
) -> str:
    """The card of a full fine-tuning run (``--method full``): tuned component folders, no adapter."""
    base = config.model or BASE_LABEL
    gallery = _gallery(config, images, output)
    load_from = config.model or "PATH/TO/BASE/MODEL"
    unet = runs.tuned_component_dir(output, "unet").relative_to(output).as_posix()
    te_lines = ""
    te_args = ""
    if config.train_text_encoder:
        te_lines = (
            "from transformers import CLIPTextModel, CLIPTextModelWithProjection\n"
            f'te1 = CLIPTextModel.from_pretrained("{output.name}/text_encoder")\n'
            f'te2 = CLIPTextModelWithProjection.from_pretrained("{output.name}/text_encoder_2")\n'
        )
        te_args = ", text_encoder=te1, text_encoder_2=te2"
    return f"""{_front_matter(config, "full-fine-tuning")}

# Fine-tuned SDXL layers: `{config.prompt}`

Trained with [dora-diffusion](https://pypi.org/project/dora-diffusion/) on {base}: full fine-tuning of the
targeted layers (`--method full`, the DoRA paper's FT baseline), with no adapter. The tuned UNet is the diffusers
folder `{unet}`{" (and the text encoders `text_encoder/`, `text_encoder_2/`)" if config.train_text_encoder else ""};
every weight outside the targeted layers is the base model's.

| | |
|---|---|
| method | full fine-tuning (`{FULL}`) |
{_training_rows(config, resolution, trainable_parameters)}

{gallery}

## Use it with diffusers

```python
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
{te_lines}
unet = UNet2DConditionModel.from_pretrained("{output.name}/unet")
pipe = StableDiffusionXLPipeline.from_pretrained("{load_from}", unet=unet{te_args}).to("cuda")
image = pipe("{config.validation_prompt or config.prompt}", num_inference_steps=30).images[0]
```

A whole pipeline folder, or one `.safetensors` in the original SDXL layout (ComfyUI, A1111):
`dora-diffusion export --adapter {output.name} --format merged-folder --out {output.name}_pipeline` (or
`--format merged-single --out {output.name}_sdxl.safetensors`). There is no LoRA file to export: the change is
not low-rank. The weight-decomposition analysis reads the UNet folder: `dora-diffusion analyze {output.name}/unet`.

`{runs.CONFIG_NAME}` holds every option of this run.
"""


def write_model_card(
    output: Path, config: TrainConfig, *, resolution: int, trainable_parameters: int, images: list[Path]
) -> Path:
    path = Path(output) / runs.CARD_NAME
    path.write_text(
        model_card(
            config, resolution=resolution, trainable_parameters=trainable_parameters, images=images, output=Path(output)
        ),
        encoding="utf-8",
    )
    return path
