"""The embedded tiny SDXL (deterministic, SDXL-shaped, loads offline) and offline model resolution."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub read it

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from dora_diffusion import _tiny_vocab, models
from dora_diffusion.models import (
    ModelNotFoundError,
    build_tiny_sdxl,
    ensure_tiny_model,
    load_pipeline,
    resolve_model,
    tiny_sdxl_components,
)

SHARED_SDXL = Path(__file__).resolve().parents[2] / "shared" / "sdxl"


def _digests(folder: Path) -> dict[str, str]:
    return {
        f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _real_config(name: str) -> dict:
    path = SHARED_SDXL / name
    if not path.is_file():
        pytest.skip(f"{path} not available (only in a checkout next to shared/)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture(scope="module")
def components() -> dict:
    return tiny_sdxl_components()


# --- building --------------------------------------------------------------------------------------


def test_built_folder_loads_offline_and_generates(tiny_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True, use_safetensors=True)
    image = pipe(
        "a photo of sks toy",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_two_builds_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_sdxl(tmp_path / "again")
    assert _digests(again) == _digests(tiny_dir)
    assert "unet/diffusion_pytorch_model.safetensors" in _digests(again)


def test_seed_changes_weights_and_leaves_caller_rng_alone(components: dict) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = tiny_sdxl_components(seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(other["unet"].conv_in.weight, components["unet"].conv_in.weight)


def test_build_refuses_unrelated_folder_and_keeps_it(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        build_tiny_sdxl(folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left behind


def test_build_and_resolve_refuse_a_file(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a folder")
    with pytest.raises(FileExistsError, match="model.safetensors"):
        build_tiny_sdxl(file)
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_model(file)
    assert file.read_bytes() == b"not a folder"


def test_build_fills_empty_folder_and_replaces_a_tiny_model(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    build_tiny_sdxl(folder, seed=1)
    build_tiny_sdxl(folder, seed=2)
    assert json.loads((folder / models.TINY_MARKER).read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


# --- SDXL's architecture, tiny ---------------------------------------------------------------------


def test_unet_conditioning_dimensions_add_up(components: dict) -> None:
    unet, te1, te2 = (components[k].config for k in ("unet", "text_encoder", "text_encoder_2"))
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size


@pytest.mark.parametrize(
    ("component", "config_file", "keys"),
    [
        (
            "unet",
            "unet_config.json",
            [
                "down_block_types",
                "mid_block_type",
                "up_block_types",
                "layers_per_block",
                "in_channels",
                "out_channels",
                "addition_embed_type",
                "use_linear_projection",
                "act_fn",
                "flip_sin_to_cos",
            ],
        ),
        ("vae", "vae_config.json", ["down_block_types", "up_block_types", "latent_channels", "scaling_factor"]),
        ("text_encoder", "text_encoder_config.json", ["hidden_act", "max_position_embeddings"]),
        ("text_encoder_2", "text_encoder_2_config.json", ["hidden_act", "max_position_embeddings"]),
    ],
)
def test_structure_matches_real_sdxl(components: dict, component: str, config_file: str, keys: list[str]) -> None:
    real = _real_config(config_file)
    tiny = components[component].config
    for key in keys:
        got = getattr(tiny, key) if hasattr(tiny, key) else tiny[key]
        want = real[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == want, key


@pytest.mark.parametrize(
    "name",  # SGM name -> diffusers module, as on the real model (layers_per_block 2)
    [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # input_blocks_4_1
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",  # input_blocks_8_1, 2nd layer
        "mid_block.attentions.0.transformer_blocks.1.ff.net.2",  # middle_block_1
        "up_blocks.0.attentions.2.proj_in",  # output_blocks_2_1
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",  # output_blocks_5_1
    ],
)
def test_unet_has_sdxl_module_names(components: dict, name: str) -> None:
    assert isinstance(components["unet"].get_submodule(name), torch.nn.Linear)


def test_unet_forward_shape(components: dict) -> None:
    unet = components["unet"]
    pooled = torch.randn(1, components["text_encoder_2"].config.projection_dim)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 16, 16), 10, hidden, added_cond_kwargs=cond).sample
    assert out.shape == (1, 4, 16, 16)
    assert torch.isfinite(out).all()


def test_scheduler_is_sdxls(components: dict) -> None:
    real = _real_config("scheduler_config.json")
    assert models.SDXL_SCHEDULER_CONFIG == real  # the embedded fallback is the real file
    config = components["scheduler"].config
    assert type(components["scheduler"]).__name__ == real["_class_name"]
    for key in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset"):
        assert config[key] == real[key], key


def test_scheduler_config_from_a_given_path(tmp_path: Path) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**models.SDXL_SCHEDULER_CONFIG, "steps_offset": 0}))
    assert models.sdxl_scheduler_config(path)["steps_offset"] == 0


# --- tokenizers ------------------------------------------------------------------------------------


def test_prompt_tokenizes_to_whole_words(components: dict, tiny_dir: Path) -> None:
    reloaded = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    for tokenizer in (components["tokenizer"], components["tokenizer_2"], reloaded):
        ids = tokenizer("a photo of sks toy").input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [
            "<|startoftext|>",
            "a</w>",
            "photo</w>",
            "of</w>",
            "sks</w>",
            "toy</w>",
            "<|endoftext|>",
        ]


def test_every_listed_word_is_one_token(components: dict) -> None:
    tokenizer = components["tokenizer"]
    for word in _tiny_vocab.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize(("key", "pad"), [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")])
def test_padding_as_sdxl(components: dict, key: str, pad: str) -> None:
    tokenizer = components[key]
    ids = tokenizer("a dog", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77 and len(ids) == 77
    assert tokenizer.pad_token == pad
    assert tokenizer.convert_ids_to_tokens(ids[4:]) == [pad] * 73
    encoder = components["text_encoder" if key == "tokenizer" else "text_encoder_2"]
    assert encoder.config.pad_token_id == ids[-1]


# --- resolving models offline ----------------------------------------------------------------------


def test_missing_hub_id_says_it_cannot_download() -> None:
    with pytest.raises(ModelNotFoundError, match="nobody-here/no-such-model-0") as info:
        resolve_model("nobody-here/no-such-model-0")
    assert "local Hugging Face cache" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json") as info:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


def test_local_pipeline_folder_resolves_to_itself(tiny_dir: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir


def test_cached_hub_id_resolves_and_loads(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--dora-test--tiny-sdxl"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    assert resolve_model("dora-test/tiny-sdxl") == "dora-test/tiny-sdxl"
    pipe = load_pipeline("dora-test/tiny-sdxl")
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_the_random_tiny_model_is_built_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DORA_DIFFUSION_HOME", str(tmp_path))
    folder = ensure_tiny_model()
    assert folder == tmp_path / "tiny-sdxl" == models.default_model_dir()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model() == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp  # not rebuilt
    pipe = load_pipeline(folder, dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
