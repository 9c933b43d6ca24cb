"""Full fine-tuning of the targeted layers (``--method full``, the DoRA paper's FT baseline) on the tiny SDXL:
only those layers change, a resume is exact, the tuned UNet folder loads in diffusers and is analysed, and
export writes it merged only."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora_diffusion.cli import main
from dora_diffusion.config import ConfigError, TrainConfig
from dora_diffusion.full import FullTuningError, tune_layers, tuned_layers, tuned_parameter_count
from dora_diffusion.inject import AdapterConfig, AdapterError, add_adapters, select_targets
from dora_diffusion.train import train

ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def config(tiny_model, small_data, output, **kw):
    base = dict(
        data=small_data,
        prompt="a photo of sks toy",
        output=str(output),
        model=tiny_model,
        resolution=64,
        method="full",
        targets="attn+ff",
        max_steps=3,
        validation_steps=0,
        num_validation_images=1,
        validation_inference_steps=2,
        report_to="none",
        learning_rate=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _component(folder, comp="unet", *, own_folder=False):
    """One component of a pipeline folder (``folder/comp``), or a component folder of its own."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    kw = {} if own_folder else {"subfolder": comp}
    return cls[comp].from_pretrained(folder, local_files_only=True, use_safetensors=True, **kw)


def _layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


@pytest.fixture(scope="module")
def full_run(tiny_model, small_data, tmp_path_factory):
    """A full run with the text encoders, checkpointed at every step."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(config(tiny_model, small_data, out, train_text_encoder=True, checkpoint_steps=1))
    return out, result


def test_only_the_targeted_layers_change(full_run, tiny_model):
    out, result = full_run
    assert result.adapter_file is None and not (out / "pytorch_lora_weights.safetensors").exists()
    assert result.tuned_components == [out / "unet", out / "text_encoder", out / "text_encoder_2"]
    counted = 0
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        base = _component(tiny_model, comp)
        tuned = _component(out / comp, comp, own_folder=True)  # a diffusers folder of its own: config + safetensors
        targets = set(select_targets(base, "attn+ff"))  # the layers LoRA and DoRA would wrap
        assert targets and {_layer_of(k) for k, _ in base.named_parameters()} >= targets
        b, t = base.state_dict(), tuned.state_dict()
        assert b.keys() == t.keys()
        changed = {k for k in b if not torch.equal(b[k], t[k])}
        # every targeted layer moved, nothing else did; but SDXL reads text_encoder's penultimate hidden states,
        # so no loss reaches its last layer (AdamW leaves a parameter without a gradient as it is)
        unreached = {t for t in targets if t.startswith("encoder.layers.1.")} if comp == "text_encoder" else set()
        assert {_layer_of(k) for k in changed} == targets - unreached, comp
        assert all(t[k].dtype == b[k].dtype for k in b)
        counted += sum(p.numel() for n, p in base.named_parameters() if _layer_of(n) in targets)
    assert result.trainable_parameters == counted
    assert (out / "README.md").read_text().count("full fine-tuning") >= 1


def test_trainable_parameters_are_the_targeted_layers(tiny_components):
    import copy

    unet = copy.deepcopy(tiny_components["unet"])
    names = tune_layers(unet, "attn+ff")
    assert names == select_targets(unet, "attn+ff") == tuned_layers(unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert {_layer_of(n) for n in trainable} == set(names)
    expected = sum(p.numel() for n, p in unet.named_parameters() if _layer_of(n) in set(names))
    assert tuned_parameter_count(unet) == expected
    # LoRA wraps the same layers
    lora = copy.deepcopy(tiny_components["unet"])
    assert add_adapters(lora, AdapterConfig(method="lora", rank=2, targets="attn+ff")) == names


def test_checkpoints_hold_the_tuned_layers_only(full_run, tiny_model):
    out, _ = full_run
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert not (ckpt / "adapter.safetensors").exists()
    tensors = load_file(str(ckpt / "weights.safetensors"))
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        base = _component(tiny_model, comp)
        targets = set(select_targets(base, "attn+ff"))
        keys = {k[len(comp) + 1 :] for k in tensors if k.startswith(comp + ".")}
        assert keys == {n for n, _ in base.named_parameters() if _layer_of(n) in targets}
        final = _component(out / comp, comp, own_folder=True).state_dict()
        assert all(torch.equal(tensors[f"{comp}.{k}"], final[k]) for k in keys)  # the last checkpoint = the result


@pytest.mark.slow
def test_resume_is_exact(tiny_model, small_data, tmp_path):
    """N steps, stop, resume for N more == 2N steps straight (accumulation, warm-up, the text encoders too)."""
    kw = dict(
        max_steps=4,
        checkpoint_steps=2,
        train_text_encoder=True,
        gradient_accumulation=2,
        lr_schedule="linear",
        lr_warmup_steps=1,
        cache_latents=False,
    )
    straight = train(config(tiny_model, small_data, tmp_path / "straight", **kw))
    stopped = train(
        config(tiny_model, small_data, tmp_path / "resumed", **kw), should_stop=lambda step, loss: step == 2
    )
    assert stopped.stopped and not (tmp_path / "resumed" / "unet").exists()
    resumed = train(config(tiny_model, small_data, tmp_path / "resumed", resume="latest", **kw))
    assert resumed.final_loss == straight.final_loss
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        a, b = (_component(r.output / comp, comp, own_folder=True).state_dict() for r in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp


def test_mixed_precision_keeps_the_frozen_weights_exact(tiny_model, small_data, tmp_path):
    """bf16 computes with a cast base; the tuned layers train in fp32, and the saved UNet's other weights are
    the base's own, not their bf16 roundings."""
    out = tmp_path / "bf16"
    train(config(tiny_model, small_data, out, targets="attn", mixed_precision="bf16", max_steps=2))
    base, tuned = _component(tiny_model, "unet").state_dict(), _component(out / "unet", own_folder=True).state_dict()
    targets = set(select_targets(_component(tiny_model, "unet"), "attn"))
    changed = {_layer_of(k) for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == targets
    assert {t.dtype for t in tuned.values()} == {torch.float32}


def test_the_unet_folder_is_analysed(full_run, tiny_model):
    from dora_diffusion.analysis import analyze_runs

    out, _ = full_run
    result = analyze_runs([out / "unet"], model=tiny_model, layers=list(ATTN_FF))
    rows = result.rows
    assert rows and {r.method for r in rows} == {"full"} and {r.run for r in rows} == {out.name}
    assert len(rows) == len(select_targets(_component(tiny_model, "unet"), "attn+ff"))
    assert all(r.delta_m > 0 and r.delta_d > 0 for r in rows)


def test_export_writes_merged_only(full_run, tiny_model, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from dora_diffusion.export import export_adapter

    out, _ = full_run
    with pytest.raises(FullTuningError, match="full fine-tuning run \\(method 'full'\\).*kohya.*merged-folder"):
        export_adapter(out, "kohya", tmp_path / "k.safetensors")
    assert main(["export", "--adapter", str(out), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 2
    assert "method 'full'" in capsys.readouterr().err
    folder = export_adapter(out, "merged-folder", tmp_path / "merged")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, comp).state_dict(), _component(out / comp, comp, own_folder=True).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), comp
    # a checkpoint of the run: its tuned layers written into the base model
    from_ckpt = export_adapter(out / "checkpoints" / "checkpoint-2", "merged-folder", tmp_path / "merged-2")
    unet2 = _component(from_ckpt, "unet").state_dict()
    w2 = load_file(str(out / "checkpoints" / "checkpoint-2" / "weights.safetensors"))
    base = _component(tiny_model, "unet").state_dict()
    for k, v in unet2.items():
        assert torch.equal(v, w2.get(f"unet.{k}", base[k])), k
    single = export_adapter(out, "merged-single", tmp_path / "sdxl.safetensors")
    assert single.is_file()
    # a run that did not finish has no tuned folders yet: the error points at its checkpoints
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished, ignore=shutil.ignore_patterns("unet", "text_encoder*"))
    with pytest.raises(FullTuningError, match="no tuned component folder.*did it finish.*checkpoint-3"):
        export_adapter(unfinished, "merged-folder", tmp_path / "never")


def test_adapter_options_are_refused_for_full(tiny_model, small_data, tmp_path):
    for bad, field in ((dict(dropout=0.1), "dropout"), (dict(policy="ff=magnitude"), "policy")):
        with pytest.raises(ConfigError, match=f"{field}: an adapter option; method 'full'"):
            config(tiny_model, small_data, tmp_path, **bad)
    with pytest.raises(ConfigError, match="norm_grad"):
        config(tiny_model, small_data, tmp_path, norm_grad="exact")
    with pytest.raises(ConfigError, match="method: 'full' .* has no adapter"):
        config(tiny_model, small_data, tmp_path).adapter_config()
    with pytest.raises(ConfigError, match="method: must be one of lora, dora, magnitude, dvora, full"):
        config(tiny_model, small_data, tmp_path, method="ft")
    cfg = config(tiny_model, small_data, tmp_path / "x", targets="to_qq")  # a typo: refused when training starts
    with pytest.raises(AdapterError, match="'to_qq' matched no nn.Linear in UNet2DConditionModel"):
        train(cfg)
    assert not (tmp_path / "x").exists()


def test_cli_trains_full(tiny_model, small_data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", small_data, "--prompt", "a photo of sks toy", "--model", tiny_model, "--method", "full"]
    args += ["--output", str(out), "--max-steps", "1", "--resolution", "64", "--report-to", "none"]
    args += ["--num-validation-images", "1", "--validation-inference-steps", "1", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"tuned: {out / 'unet'}" in printed and "adapter:" not in printed
    assert Path(out / "unet" / "config.json").is_file()
