"""The original SDXL single-file layout: SGM names, diffusers' converters and from_single_file as oracles."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dora_diffusion import AdapterConfig, add_adapters
from dora_diffusion.formats import original
from dora_diffusion.formats.original import (
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    OriginalFormatError,
    diffusers_unet_name,
    ldm_vae_name,
    save_original_sdxl,
    sgm_unet_name,
    to_original_sdxl,
)
from dora_diffusion.models import build_tiny_sdxl
from helpers import text_ids, unet_inputs

SDXL = Path(__file__).resolve().parents[2] / "shared" / "sdxl"
EXTRAS = {original.POSITION_IDS_KEY, original.LOGIT_SCALE_KEY}  # in the original file, not model weights
PREFIXES = (UNET_PREFIX, VAE_PREFIX, "conditioner.embedders.0.", "conditioner.embedders.1.")


def sdxl_config(name):
    path = SDXL / f"{name}_config.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def real_sdxl():
    """SDXL base 1.0's four models from the real configs, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**sdxl_config("unet")),
            "vae": AutoencoderKL(**sdxl_config("vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**sdxl_config("text_encoder"))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_config("text_encoder_2"))),
        }


@pytest.fixture(scope="module")
def real_checkpoint(real_sdxl):
    return to_original_sdxl(real_sdxl)


@pytest.fixture(scope="module")
def real_unet_loaded(real_sdxl, real_checkpoint):
    """diffusers' own loader applied to our SGM keys: diffusers name -> the tensor it took."""
    return convert_ldm_unet_checkpoint(real_checkpoint, dict(real_sdxl["unet"].config))


# --- names -----------------------------------------------------------------------------------------

KNOWN = [
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("down_blocks.0.resnets.0.time_emb_proj", "input_blocks.1.0.emb_layers.1"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.norm1", "input_blocks.4.0.in_layers.0"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("mid_block.resnets.0.norm2", "middle_block.0.out_layers.0"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "middle_block.1.transformer_blocks.0.ff.net.0.proj"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.resnets.0.conv_shortcut", "output_blocks.0.0.skip_connection"),
    ("up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2", "output_blocks.2.1.transformer_blocks.1.ff.net.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv2", "output_blocks.6.0.out_layers.3"),
    ("up_blocks.2.resnets.2.norm2", "output_blocks.8.0.out_layers.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
]


@pytest.mark.parametrize("diffusers_name, sgm_name", KNOWN)
def test_known_unet_names(diffusers_name, sgm_name, real_sdxl, real_checkpoint, real_unet_loaded):
    unet = real_sdxl["unet"]
    for suffix in ("", ".weight"):
        assert sgm_unet_name(diffusers_name + suffix) == sgm_name + suffix
        assert sgm_unet_name(diffusers_name + suffix, unet.config) == sgm_name + suffix
        assert diffusers_unet_name(sgm_name + suffix) == diffusers_name + suffix
    assert diffusers_unet_name(UNET_PREFIX + sgm_name) == diffusers_name
    # diffusers' own loader maps that SGM key to that diffusers key (the very same tensor comes out)
    assert real_unet_loaded[diffusers_name + ".weight"] is real_checkpoint[UNET_PREFIX + sgm_name + ".weight"]


def test_default_layout_is_sdxl_base():
    config = sdxl_config("unet")
    for key, value in original.SDXL_UNET_LAYOUT.items():
        assert (tuple(config[key]) if isinstance(config[key], list) else config[key]) == value


def _check_unet_names(unet):
    """Every parameter and every Linear/Conv/Norm module name maps and maps back; no two share a name;
    diffusers' converter, given the SGM keys, gives back exactly the UNet's keys."""
    state = unet.state_dict()
    sgm = {name: sgm_unet_name(name, unet.config) for name in state}
    assert len(set(sgm.values())) == len(sgm)
    assert all(diffusers_unet_name(s, unet.config) == d for d, s in sgm.items())
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    modules = [n for n, m in unet.named_modules() if isinstance(m, layers)]
    assert modules and all(diffusers_unet_name(sgm_unet_name(n, unet), unet) == n for n in modules)
    loaded = convert_ldm_unet_checkpoint({UNET_PREFIX + s: state[d] for d, s in sgm.items()}, dict(unet.config))
    assert set(loaded) == set(state)
    assert all(loaded[name] is state[name] for name in state)


def test_unet_names_tiny(tiny_components):
    _check_unet_names(tiny_components["unet"])


def test_unet_names_real_sdxl(real_sdxl):
    _check_unet_names(real_sdxl["unet"])


def test_unet_names_follow_the_config():
    """An SD 1.x-shaped UNet (attention in the first three levels, one resnet per level): names follow
    its config, and diffusers' converter agrees."""
    config = dict(
        sample_size=8,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8,
        attention_head_dim=2,
    )
    unet = UNet2DConditionModel(**config)
    _check_unet_names(unet)
    assert sgm_unet_name("down_blocks.1.attentions.0.proj_in", unet.config) == "input_blocks.3.1.proj_in"
    assert sgm_unet_name("up_blocks.0.upsamplers.0.conv", unet.config) == "output_blocks.1.1.conv"
    assert sgm_unet_name("up_blocks.1.upsamplers.0.conv", unet.config) == "output_blocks.3.2.conv"


def test_unknown_names_are_refused():
    for name in ("down_blocks.7.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in", "foo"):
        with pytest.raises(OriginalFormatError, match="no SGM equivalent"):
            sgm_unet_name(name)
    with pytest.raises(OriginalFormatError):
        diffusers_unet_name("input_blocks.1.0.in_layers")  # the Sequential itself has no diffusers module
    assert ldm_vae_name("decoder.up_blocks.0.resnets.2.conv1.weight") == "decoder.up.3.block.2.conv1.weight"
    assert ldm_vae_name("encoder.mid_block.attentions.0.to_out.0.bias") == "encoder.mid.attn_1.proj_out.bias"


# --- the real SDXL layout (meta device) ------------------------------------------------------------


def test_real_sdxl_checkpoint_layout(real_sdxl, real_checkpoint):
    ck = real_checkpoint
    assert len(ck) == 2515  # as sd_xl_base_1.0.safetensors
    assert infer_diffusers_model_type(ck) == "xl_base"
    assert {key for key in ck if not key.startswith(PREFIXES)} == set()
    vae = real_sdxl["vae"]
    assert ck[VAE_PREFIX + "decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ck[OPEN_CLIP_PREFIX + "text_projection"].shape == (1280, 1280)
    assert ck[OPEN_CLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    # diffusers' converters give back every key of each model, with its shape
    te2 = real_sdxl["text_encoder_2"]
    for model, converted in (
        (real_sdxl["unet"], convert_ldm_unet_checkpoint(ck, dict(real_sdxl["unet"].config))),
        (vae, convert_ldm_vae_checkpoint(ck, dict(vae.config))),
        (te2, convert_open_clip_checkpoint(te2, ck, prefix=OPEN_CLIP_PREFIX)),
    ):
        state = model.state_dict()
        assert set(converted) == set(state)
        assert all(converted[k].shape == state[k].shape for k in state)
    te1 = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ck).items()}
    assert set(te1) == set(real_sdxl["text_encoder"].state_dict()) | {"embeddings.position_ids"}


# --- the tiny pipeline through from_single_file ----------------------------------------------------


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_components):
    folder = build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")
    path = save_original_sdxl(tiny_components, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    return folder, path


def test_checkpoint_keys(single_file, tiny_components):
    _, path = single_file
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        position_ids = f.get_tensor(original.POSITION_IDS_KEY)
    assert {key for key in keys if not key.startswith(PREFIXES)} == set()
    assert all(any(key.startswith(p) for key in keys) for p in PREFIXES)
    assert EXTRAS <= keys and position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(77))]
    # one key per model tensor, except q/k/v (6 tensors) fused into in_proj_weight/bias in each te2 layer
    counts = {
        name: len(tiny_components[name].state_dict()) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    te2_layers = tiny_components["text_encoder_2"].config.num_hidden_layers
    assert len(keys) == sum(counts.values()) - 4 * te2_layers + len(EXTRAS)
    # the tiny text_encoder_2 has 2 layers, so diffusers' SDXL probe (resblocks.9) misses: config= is needed
    assert infer_diffusers_model_type(to_original_sdxl(tiny_components)) != "xl_base"


def test_from_single_file_matches_the_pipeline(single_file, tiny_components):
    folder, path = single_file
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, loaded = tiny_components[name], getattr(pipe, name)
        assert type(loaded) is type(ours)
        expected, got = ours.state_dict(), loaded.state_dict()
        assert set(got) == set(expected), name  # nothing missing, nothing extra
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()]), name

    tol = dict(rtol=0, atol=1e-5)
    with torch.no_grad():
        unet = tiny_components["unet"]
        torch.testing.assert_close(pipe.unet(**unet_inputs(pipe.unet)).sample, unet(**unet_inputs(unet)).sample, **tol)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(
            pipe.vae.decode(latents).sample, tiny_components["vae"].decode(latents).sample, **tol
        )
        ids = text_ids()
        a, b = (
            pipe.text_encoder(ids, output_hidden_states=True),
            tiny_components["text_encoder"](ids, output_hidden_states=True),
        )
        torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], **tol)
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, **tol)
        a, b = (
            pipe.text_encoder_2(ids, output_hidden_states=True),
            tiny_components["text_encoder_2"](ids, output_hidden_states=True),
        )
        torch.testing.assert_close(a.text_embeds, b.text_embeds, **tol)
        torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], **tol)


# --- saving ----------------------------------------------------------------------------------------


def test_save_dtype_and_metadata(tmp_path, tiny_components):
    path = save_original_sdxl(
        tiny_components, tmp_path / "half.safetensors", dtype=torch.float16, metadata={"a": "b", "n": 3}
    )
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"a": "b", "n": "3"}
        assert f.get_tensor(UNET_PREFIX + "input_blocks.0.0.weight").dtype == torch.float16
        assert f.get_tensor(original.POSITION_IDS_KEY).dtype == torch.int64
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]


def test_failed_save_keeps_the_old_file(tmp_path, tiny_components, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"precious")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_original_sdxl(tiny_components, path)
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with pytest.raises(OriginalFormatError, match="safetensors"):
        save_original_sdxl(tiny_components, tmp_path / "model.ckpt")


def test_unmerged_adapters_are_refused(tiny_components):
    components = dict(tiny_components, unet=copy.deepcopy(tiny_components["unet"]))
    add_adapters(components["unet"], AdapterConfig(method="dora", rank=2))
    with pytest.raises(OriginalFormatError, match="merge"):
        to_original_sdxl(components)
