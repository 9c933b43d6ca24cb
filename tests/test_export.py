"""Export and import: exact round trips for every format, other tools' DoRA layouts, verify, bad files."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dora_diffusion import AdapterConfig, AdapterFileError, add_adapters, load_adapter, save_adapter
from dora_diffusion.export import export_adapter, verify_adapter
from dora_diffusion.formats.kohya import save_kohya
from dora_diffusion.layers import AdapterLinear, DoRAInputAxisLinear, adapter_modules, column_norm
from helpers import randomize_adapters, text_ids, unet_inputs

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def base(tiny_model):
    return StableDiffusionXLPipeline.from_pretrained(tiny_model)


def trained(tiny_model, method, components, targets="attn+ff", seed=3):
    pipe = base(tiny_model)
    for i, comp in enumerate(components):
        add_adapters(getattr(pipe, comp), AdapterConfig(method=method, rank=4, alpha=6.0, targets=targets))
        randomize_adapters(
            getattr(pipe, comp), seed=seed + i, std=0.05
        )  # realistic size: larger random adapters make the fp32 UNet chaotic
    return pipe


def outputs(pipe):
    with torch.no_grad():
        return (
            pipe.unet(**unet_inputs(pipe.unet)).sample,
            pipe.text_encoder(text_ids()).last_hidden_state,
            pipe.text_encoder_2(text_ids()).text_embeds,
        )


def assert_same(a, b, rtol=1e-5):
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() <= rtol * max(1.0, y.abs().max()), (x - y).abs().max()


def _saved_run(tmp_path, tiny_model, method, components):
    pipe = trained(tiny_model, method, components)
    run = tmp_path / f"run-{method}-{len(components)}"
    save_adapter(pipe, run, metadata={"base_model": tiny_model})
    (run / "training_config.json").write_text(json.dumps({"model": tiny_model}))
    return pipe, run


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("components", [("unet",), COMPONENTS], ids=["unet", "unet+te"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
def test_adapter_exports_round_trip_exactly(tmp_path, tiny_model, method, components, fmt):
    pipe, run = _saved_run(tmp_path, tiny_model, method, components)
    file = export_adapter(run, fmt, tmp_path / f"export-{fmt}")
    loaded = base(tiny_model)
    report = load_adapter(loaded, file)
    assert set(report.layers) == set(components) and not report.keys_left_over
    assert_same(outputs(loaded), outputs(pipe))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_exports_equal_the_adapter_and_each_other(tmp_path, tiny_model, method):
    pipe, run = _saved_run(tmp_path, tiny_model, method, COMPONENTS)
    folder = export_adapter(run, "merged-folder", tmp_path / "merged")
    assert folder.stat().st_mode & 0o777 == 0o755  # a normal folder, not mkdtemp's 0700
    single = export_adapter(run, "merged-single", tmp_path / "merged.safetensors")
    from_folder = StableDiffusionXLPipeline.from_pretrained(folder)
    # diffusers' own single-file loader as the oracle for the original SDXL layout
    from_single = StableDiffusionXLPipeline.from_single_file(str(single), config=tiny_model, local_files_only=True)
    assert not any(isinstance(m, AdapterLinear) for m in from_folder.unet.modules())
    assert_same(outputs(from_folder), outputs(pipe))
    assert_same(outputs(from_single), outputs(from_folder))


def test_merged_export_dtype(tmp_path, tiny_model):
    _, run = _saved_run(tmp_path, tiny_model, "dora", ("unet",))
    folder = export_adapter(run, "merged-folder", tmp_path / "merged16", dtype="bfloat16")
    assert StableDiffusionXLPipeline.from_pretrained(folder).unet.dtype == torch.float32  # loads upcast by default...
    with safe_open(str(next((folder / "unet").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # ...but is stored in bf16


def test_kohya_file_layout(tmp_path, tiny_model):
    pipe, _ = _saved_run(tmp_path, tiny_model, "dora", COMPONENTS)
    file = save_kohya(pipe, tmp_path / "k.safetensors")
    t = load_file(str(file))
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # SGM name, as sd-scripts writes SDXL
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha", f"{q}.dora_scale"} <= t.keys()
    assert t[f"{q}.dora_scale"].shape == (64, 1) and float(t[f"{q}.alpha"]) == 6.0  # [out, 1]: LyCORIS >= 3.2 axis
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.dora_scale" in t
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in t
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"])["wd_on_output"] == "true"


def test_diffusers_reads_our_kohya_lora_names(tmp_path, tiny_model):
    """diffusers' kohya converter as the oracle for our SGM names (LoRA: it drops dora_scale for SDXL)."""
    pipe = trained(tiny_model, "lora", COMPONENTS, targets="attn")
    file = save_kohya(pipe, tmp_path / "k.safetensors")
    theirs = base(tiny_model)
    theirs.load_lora_weights(str(file))
    assert_same(outputs(theirs), outputs(pipe), rtol=1e-4)


def _dense_input_axis(w0, down, up, alpha, m):
    w = w0 + (alpha / down.shape[0]) * up @ down
    return w * (m / w.norm(dim=0)).unsqueeze(0)  # one magnitude per INPUT column


def test_input_axis_dora_scale_loads_by_its_definition(tmp_path, tiny_model):
    """A LyCORIS < 3.2 / OneTrainer style file (dora_scale [1, in]) built here from the definition."""
    ref = base(tiny_model)
    g = torch.Generator().manual_seed(0)
    names = [n for n, m in ref.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2"))]
    from dora_diffusion.formats.original import sgm_unet_name

    tensors, dense = {}, {}
    for name in names:
        w0 = ref.unet.get_submodule(name).weight.detach()
        out_f, in_f = w0.shape
        down, up = torch.randn(4, in_f, generator=g) * 0.3, torch.randn(out_f, 4, generator=g) * 0.3
        m = w0.norm(dim=0) * (1 + 0.2 * torch.randn(in_f, generator=g))
        key = "lora_unet_" + sgm_unet_name(name).replace(".", "_")
        tensors.update(
            {
                f"{key}.lora_down.weight": down,
                f"{key}.lora_up.weight": up,
                f"{key}.alpha": torch.tensor(2.0),
                f"{key}.dora_scale": m.reshape(1, in_f),
            }
        )
        dense[name] = _dense_input_axis(w0, down, up, 2.0, m)
    file = tmp_path / "onetrainer.safetensors"
    save_file(tensors, str(file))
    pipe = base(tiny_model)
    report = load_adapter(pipe, file)
    assert report.method == {"unet": "dora_in"} and report.layers == {"unet": len(names)}
    for name in names:
        layer = pipe.unet.get_submodule(name)
        assert isinstance(layer, DoRAInputAxisLinear)
        torch.testing.assert_close(layer.adapted_weight(), dense[name], rtol=1e-5, atol=1e-6)
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(
            layer(x), torch.nn.functional.linear(x, dense[name], layer.base.bias), rtol=1e-5, atol=1e-5
        )
    with torch.no_grad():  # the whole UNet equals one whose weights are the dense formula
        for name in names:
            ref.unet.get_submodule(name).weight.copy_(dense[name])
    assert_same(outputs(pipe)[:1], outputs(ref)[:1])


def test_input_axis_norm_is_the_transpose_of_the_row_norm():
    g = torch.Generator().manual_seed(1)
    w0, a, b = torch.randn(7, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)
    torch.testing.assert_close(column_norm(w0, a, b, 0.7), (w0 + 0.7 * b @ a).norm(dim=0))


def test_square_layer_1d_dora_scale_needs_the_axis(tmp_path, tiny_model):
    pipe = base(tiny_model)
    name = next(n for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    from dora_diffusion.formats.original import sgm_unet_name

    key = "lora_unet_" + sgm_unet_name(name).replace(".", "_")
    w0 = pipe.unet.get_submodule(name).weight
    tensors = {
        f"{key}.lora_down.weight": torch.zeros(2, w0.shape[1]),
        f"{key}.lora_up.weight": torch.zeros(w0.shape[0], 2),
        f"{key}.dora_scale": w0.detach().norm(dim=1),
    }
    file = tmp_path / "ambiguous.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(AdapterFileError, match="square layer"):
        load_adapter(pipe, file)
    save_file(tensors, str(file), metadata={"ss_network_args": json.dumps({"wd_on_output": "true"})})
    assert load_adapter(pipe, file).method == {"unet": "dora"}


def test_peft_and_diffusers_script_layouts(tmp_path, tiny_model):
    """Keys as PEFT's get_peft_model_state_dict and diffusers' DreamBooth scripts write them."""
    pipe = trained(tiny_model, "dora", ("unet",), targets="attn")
    ours = load_file(str(save_adapter(pipe, tmp_path / "ours")))
    peft_style = {}
    for k, v in ours.items():
        k = k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")
        peft_style[k.replace("unet.", "base_model.model.", 1)] = v
    file = tmp_path / "adapter_model.safetensors"
    save_file(peft_style, str(file))
    loaded = base(tiny_model)
    # no alpha in a bare PEFT file: alpha = rank, so compare with the same scale
    for _, a in adapter_modules(pipe.unet):
        a.alpha = float(a.rank)
    load_adapter(loaded, file)
    assert_same(outputs(loaded)[:1], outputs(pipe)[:1])


def test_verify(tmp_path, tiny_model, capsys):
    _, run = _saved_run(tmp_path, tiny_model, "dora", COMPONENTS)
    file = export_adapter(run, "kohya", tmp_path / "k.safetensors")
    report = verify_adapter(file, tiny_model)
    assert report.ok and set(report.errors) == set(COMPONENTS), report
    diffusers_file = export_adapter(run, "diffusers", tmp_path / "d")
    assert verify_adapter(diffusers_file, tiny_model, loader="diffusers").ok  # our key spelling loads right there
    kohya_in_diffusers = verify_adapter(file, tiny_model, loader="diffusers")
    assert not kohya_in_diffusers.ok  # diffusers drops dora_scale of SDXL kohya files
    from dora_diffusion.cli import main

    assert main(["verify", "--adapter", str(file), "--model", tiny_model]) == 0
    assert "reproduces its recorded outputs" in capsys.readouterr().out
    other = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.mul_(1.01)
    other.save_pretrained(tmp_path / "other-base")
    assert main(["verify", "--adapter", str(file), "--model", str(tmp_path / "other-base")]) == 1


def test_cli_comfyui_export_says_which_tools_it_is_for(tmp_path, tiny_model, capsys):
    _, run = _saved_run(tmp_path, tiny_model, "dora", COMPONENTS)
    from dora_diffusion.cli import main

    assert main(["export", "--adapter", str(run), "--format", "comfyui", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "adapter_comfyui.safetensors" in out and "ComfyUI and Forge" in out
    assert "Comfy-Org/ComfyUI#15458" in out and "use the kohya export" in out
    assert verify_adapter(tmp_path / "c" / "adapter_comfyui.safetensors", tiny_model).ok  # our loader reads it exactly


def test_verify_with_diffusers_on_a_wrong_shape_file_is_one_line(tmp_path, tiny_model, capsys):
    """A file whose tensors no longer fit the model but that keeps its probe: diffusers' loader raises
    deep inside PEFT; verify says so in one line naming the file, as our loader does."""
    _, run = _saved_run(tmp_path, tiny_model, "lora", ("unet",))
    good = export_adapter(run, "diffusers", tmp_path / "d")
    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    key = next(k for k in sorted(tensors) if k.endswith("lora.down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)  # [r, in + 3]
    bad = tmp_path / "bad" / "pytorch_lora_weights.safetensors"
    bad.parent.mkdir()
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(AdapterFileError, match="bad.*pytorch_lora_weights") as raised:
        verify_adapter(bad, tiny_model, loader="diffusers")
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 600, str(raised.value)
    from dora_diffusion.cli import main

    assert main(["verify", "--adapter", str(bad), "--model", tiny_model, "--loader", "diffusers"]) == 2
    err = capsys.readouterr().err  # besides diffusers' progress bars: one line
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {raised.value}"
    ], err[-2000:]


def test_bad_kohya_files_leave_the_pipeline_unchanged(tmp_path, tiny_model):
    pipe = base(tiny_model)
    before = outputs(pipe)
    sd15 = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
    }
    file = tmp_path / "sd15_kohya.safetensors"
    save_file(sd15, str(file))
    with pytest.raises(AdapterFileError, match=r"sd15_kohya\.safetensors.*does not fit"):
        load_adapter(pipe, file)
    name = next(n for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    from dora_diffusion.formats.original import sgm_unet_name

    key = "lora_unet_" + sgm_unet_name(name).replace(".", "_")
    bad_scale = {
        f"{key}.lora_down.weight": torch.zeros(2, 64),
        f"{key}.lora_up.weight": torch.zeros(64, 2),
        f"{key}.dora_scale": torch.ones(3, 1),
    }
    save_file(bad_scale, str(tmp_path / "bad_scale.safetensors"))
    with pytest.raises(AdapterFileError, match="dora_scale shape"):
        load_adapter(pipe, tmp_path / "bad_scale.safetensors")
    assert not any(isinstance(m, AdapterLinear) for c in COMPONENTS for m in getattr(pipe, c).modules())
    assert_same(outputs(pipe), before, rtol=0)


def test_export_refuses_to_overwrite_and_bad_format(tmp_path, tiny_model):
    _, run = _saved_run(tmp_path, tiny_model, "lora", ("unet",))
    target = tmp_path / "taken.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        export_adapter(run, "kohya", target)
    assert target.read_bytes() == b"precious"
    with pytest.raises(AdapterFileError, match="format"):
        export_adapter(run, "ckpt", tmp_path / "x")


@pytest.mark.parametrize("use_dora", [False, True])
def test_files_written_like_diffusers_dreambooth_script(tmp_path, tiny_model, use_dora):
    """PEFT adapters saved exactly as diffusers' train_dreambooth_lora_sdxl.py saves them, loaded by us,
    reproduce the PEFT model's outputs (UNet and both text encoders)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = base(tiny_model)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            use_dora=use_dora,
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    te_config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights="gaussian",
        use_dora=use_dora,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    pipe.text_encoder.add_adapter(te_config)
    pipe.text_encoder_2.add_adapter(te_config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.abs().mean() if "magnitude" in n else 1))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder_2)),
    )
    ours = base(tiny_model)
    report = load_adapter(ours, tmp_path)
    assert report.method == {c: "dora" if use_dora else "lora" for c in COMPONENTS} and not report.keys_left_over
    assert_same(outputs(ours), outputs(pipe))
