"""The tiny SDXL's configs: SDXL base 1.0's structure (component classes, block layout, conditioning) with
narrow widths, and SDXL's scheduler config. ``models`` builds the random-weight tiny model from them; the
embedded, pretrained one (``world``) has the same UNet and text encoders with ``TOY_VAE_CONFIG``'s VAE."""

from __future__ import annotations

from typing import Any

from . import _tiny_vocab

# Same values as shared/sdxl/scheduler_config.json (SDXL base 1.0); a test keeps the two equal.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# --- tiny configs: SDXL's structure, narrow widths -------------------------------------------------

_VOCAB, _ = _tiny_vocab.vocab_and_merges()

TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {  # SDXL: hidden 768, 12 layers, 12 heads
    "vocab_size": len(_VOCAB),
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": _VOCAB[_tiny_vocab.BOS],
    "eos_token_id": _VOCAB[_tiny_vocab.EOS],
    "pad_token_id": _VOCAB[_tiny_vocab.EOS],
}

TINY_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {  # SDXL: hidden 1280, 32 layers, 20 heads, projection 1280
    **TINY_TEXT_ENCODER_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "hidden_act": "gelu",
    "projection_dim": 32,
    "pad_token_id": _VOCAB["!"],
}

_ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,  # latent side: 16 * 8 = 128 px images by default (SDXL: 128 -> 1024 px)
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),  # SDXL: (320, 640, 1280)
    "layers_per_block": 2,  # as SDXL, so SGM block indices line up
    "transformer_layers_per_block": (1, 1, 2),  # SDXL: (1, 2, 10)
    "attention_head_dim": (2, 4, 4),  # diffusers' name for the head COUNT: 16 wide (SDXL: (5, 10, 20), 64)
    "norm_num_groups": 8,
    # text_encoder's and text_encoder_2's hidden states side by side
    "cross_attention_dim": (TINY_TEXT_ENCODER_CONFIG["hidden_size"] + TINY_TEXT_ENCODER_2_CONFIG["hidden_size"]),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _ADDITION_TIME_EMBED_DIM,
    # pooled text_encoder_2 output + 6 micro-conditioning time ids, each embedded addition_time_embed_dim wide
    "projection_class_embeddings_input_dim": (
        TINY_TEXT_ENCODER_2_CONFIG["projection_dim"] + 6 * _ADDITION_TIME_EMBED_DIM
    ),
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,  # 4 blocks: 8x downsample, as SDXL
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 32, 32),  # SDXL: (128, 256, 512, 512)
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}


# The learned embedded model (dora_diffusion.world): 64 px images, a 4x VAE, so the same 16x16 latents
# and the same UNet and text encoders as above. Pretrained on the toy world and shipped with the package.
TOY_VAE_CONFIG: dict[str, Any] = {
    **TINY_VAE_CONFIG,
    "down_block_types": ("DownEncoderBlock2D",) * 3,  # 3 blocks: 4x downsample
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "sample_size": 64,
}
