"""Our exports in the tools people load them in, run with those tools' own code.

One test per cell of README's "Which tool loads what" table, asserting the verdict measured there:
- ComfyUI: its own source at a fixed commit (``../shared/clients/comfyui`` through ``comfy_apply.py``; GPL, a test
  fixture only, never imported by the package). Skipped when that folder is missing.
- LyCORIS (PyPI ``lycoris-lora``): its kohya network loaders (``create_network_from_weights``, and ``create_network``
  from the file's ``ss_network_args`` + ``load_weights``) and its merge.
- diffusers: ``load_lora_weights`` + ``fuse_lora``.
Error per adapted weight: ``‖W'client − W'ours‖ / ‖W'ours − W0‖``, W'ours = our ``merged-folder`` export. The adapters
are strong (‖W' − W0‖ / ‖W0‖ of 0.3 to 0.6 per weight, UNet and both text encoders), so no approximation hides.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dora_diffusion import AdapterConfig, AdapterError, AdapterFileError, add_adapters, load_adapter, save_adapter
from dora_diffusion.export import export_adapter
from dora_diffusion.formats.kohya import kohya_name
from dora_diffusion.formats.original import sgm_unet_name
from dora_diffusion.layers import adapter_modules, lora_delta, merged_weight
from dora_diffusion.models import build_tiny_sdxl, load_pipeline

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
EXACT = 1e-4
CLIENTS = Path(__file__).resolve().parents[2] / "shared" / "clients"
LAYERS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
)
METHODS = (
    "dora",
    "magnitude",
    "dvora",
    "lora",
    "dora_in",
)  # dora_in: an input-axis file from another tool, re-exported


# --------------------------------------------------------------------------------------------
# Strong adapters, their exports, our merged weights
# --------------------------------------------------------------------------------------------


def state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


@torch.no_grad()
def strengthen(pipe, seed: int) -> None:
    """Random adapter tensors with ‖sΔ‖ = 0.4·‖W0‖ per layer and magnitudes ~30 % off ‖W0‖ (a trained DoRA
    moves them by a few percent: this is the worst case for a loader that gets the normalisation wrong)."""
    g = torch.Generator().manual_seed(seed)
    for comp in COMPONENTS:
        for _, a in adapter_modules(getattr(pipe, comp)):
            for n, p in a.named_parameters():
                if n.startswith("base."):
                    continue
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * torch.exp(0.3 * noise) if n == "magnitude" else noise)  # magnitudes stay positive
            if a.method != "magnitude":
                r = float(lora_delta(a.lora_A, a.lora_B, a.scaling).norm() / a.base.weight.norm())
                (a.vera_b if a.method == "dvora" else a.lora_B).mul_(0.4 / r)


def input_axis_file(pipe, path: Path, seed: int = 7) -> Path:
    """A kohya file with ``dora_scale [1, in]`` (LyCORIS < 3.2, OneTrainer), with our module names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for comp in COMPONENTS:
        module = getattr(pipe, comp)
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.endswith(LAYERS)]
        for name in names:
            w0 = module.get_submodule(name).weight.detach()
            out_f, in_f = w0.shape
            down = torch.randn(4, in_f, generator=g) / in_f**0.5
            up = torch.randn(out_f, 4, generator=g)
            up *= 0.4 * w0.norm() / (1.5 * up @ down).norm()  # alpha 6, rank 4
            v = w0 + 1.5 * up @ down
            key = kohya_name(comp, module, name)
            tensors.update(
                {
                    f"{key}.lora_down.weight": down,
                    f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(6.0),
                    f"{key}.dora_scale": (v.norm(dim=0) * (1 + 0.3 * torch.randn(in_f, generator=g))).reshape(1, in_f),
                }
            )
    save_file(
        tensors,
        str(path),
        metadata={"ss_network_args": json.dumps({"algo": "lora", "dora_wd": "true", "wd_on_output": "false"})},
    )
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    model = str(build_tiny_sdxl(root / "tiny-sdxl"))
    return SimpleNamespace(root=root, model=model, base=state_dicts(load_pipeline(model)), files={})


def adapter(made, method: str) -> Path:
    """The run folder (or, for ``dora_in``, the other tool's file) of a strong ``method`` adapter on all three
    components."""
    if ("run", method) not in made.files:
        pipe = load_pipeline(made.model)
        if method == "dora_in":
            made.files[("run", method)] = input_axis_file(pipe, made.root / "input_axis.safetensors")
        else:
            for comp in COMPONENTS:
                add_adapters(getattr(pipe, comp), AdapterConfig(method=method, rank=4, alpha=6.0, targets="attn+ff"))
            strengthen(pipe, seed=len(method))
            run = made.root / f"run-{method}"
            save_adapter(pipe, run, metadata={"base_model": made.model})
            made.files[("run", method)] = run
    return made.files[("run", method)]


def export(made, method: str, fmt: str) -> Path:
    if (fmt, method) not in made.files:
        suffix = "" if fmt in ("diffusers", "merged-folder") else ".safetensors"
        made.files[(fmt, method)] = export_adapter(
            adapter(made, method), fmt, made.root / f"{method}-{fmt}{suffix}", model=made.model
        )
    return made.files[(fmt, method)]


def ours(made, method: str) -> dict[str, dict[str, torch.Tensor]]:
    """W' of our merged export."""
    if ("weights", method) not in made.files:
        made.files[("weights", method)] = state_dicts(load_pipeline(str(export(made, method, "merged-folder"))))
    return made.files[("weights", method)]


def errors(got, reference, base) -> dict[str, list[float]]:
    """Per component, ``‖W'got − W'ref‖ / ‖W'ref − W0‖`` over every weight the reference changes."""
    out: dict[str, list[float]] = {}
    for comp, sd in reference.items():
        for k, r in sd.items():
            w0 = base[comp][k]
            if k.endswith(".weight") and not torch.equal(r, w0):
                g = got.get(comp, {}).get(k, w0).double()
                out.setdefault(comp, []).append(float((g - r.double()).norm() / (r.double() - w0.double()).norm()))
    return out


def worst(errs) -> dict[str, float]:
    return {c: max(e) for c, e in errs.items()}


def best(errs) -> dict[str, float]:
    return {c: min(e) for c, e in errs.items()}


def test_the_adapters_are_strong(made):
    for method in ("dora", "dvora", "lora", "dora_in"):
        w, base = ours(made, method), made.base
        deltas = [
            float((w[c][k] - base[c][k]).norm() / base[c][k].norm())
            for c in COMPONENTS
            for k in w[c]
            if k.endswith(".weight") and not torch.equal(w[c][k], base[c][k])
        ]
        assert len(deltas) >= 40 and min(deltas) > 0.2, (method, len(deltas), min(deltas))
    changed = {c for c, sd in ours(made, "magnitude").items() for k in sd if not torch.equal(sd[k], made.base[c][k])}
    assert changed == set(COMPONENTS)


# --------------------------------------------------------------------------------------------
# ComfyUI, its own code
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy():
    if not (CLIENTS / "comfy_apply.py").is_file():
        pytest.skip(f"{CLIENTS}: ComfyUI's code (comfy_apply.py, comfyui/) not available")
    if str(CLIENTS) not in sys.path:
        sys.path.insert(0, str(CLIENTS))
    import comfy_apply

    return comfy_apply


def comfy_weights(result) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in result.weights.items():
        comp, _, name = key.partition(".")
        out.setdefault(comp, {})[name] = w
    return out


def test_the_comfyui_commit_we_record_is_the_one_tested(comfy):
    from dora_diffusion.formats.comfyui import COMFYUI_COMMIT

    assert comfy.comfy_commit() == COMFYUI_COMMIT


@pytest.mark.parametrize("method", METHODS)
def test_comfyui_applies_the_comfyui_export_exactly(made, comfy, method):
    r = comfy.apply_lora(export(made, method, "comfyui"), made.base)
    assert r.not_loaded == [] and r.not_patched == [] and r.messages == []
    errs = errors(comfy_weights(r), ours(made, method), made.base)
    assert set(errs) == set(COMPONENTS)
    assert max(worst(errs).values()) < EXACT, worst(errs)


@pytest.mark.parametrize("dtype, bound", [(torch.float16, EXACT), (torch.bfloat16, 1e-3)])
def test_comfyui_export_on_a_half_precision_copy_of_the_base(made, comfy, dtype, bound):
    """dora_scale holds ‖W0‖ / ‖W0 + ΔW‖ of the fp32 base it was exported with; on the same model stored in fp16
    (as checkpoints often are) ComfyUI stays within 1e-4 of our W' on that base (measured ≤ 4e-5), in bf16 within
    1e-3 (≤ 4e-4). ``export --format comfyui --model`` recomputes it for any other base."""
    from dora_diffusion.inject import merge_adapters

    rounded = {c: {k: v.to(dtype).float() for k, v in sd.items()} for c, sd in made.base.items()}
    pipe = load_pipeline(made.model)
    for c in COMPONENTS:
        getattr(pipe, c).load_state_dict(rounded[c])
    load_adapter(pipe, adapter(made, "dora"))
    for c in COMPONENTS:
        merge_adapters(getattr(pipe, c))
    r = comfy.apply_lora(export(made, "dora", "comfyui"), rounded)
    assert max(worst(errors(comfy_weights(r), state_dicts(pipe), rounded)).values()) < bound


@pytest.mark.parametrize("strength", [0.5, 1.5])
def test_comfyui_strength_blends_the_comfyui_export_with_the_base(made, comfy, strength):
    """ComfyUI's strength s: W0 + s·(W' − W0) for DoRA (it scales the whole change, magnitude included)."""
    r = comfy.apply_lora(export(made, "dora", "comfyui"), made.base, strength_model=strength, strength_clip=strength)
    w = ours(made, "dora")
    blended = {c: {k: made.base[c][k] + strength * (w[c][k] - made.base[c][k]) for k in w[c]} for c in COMPONENTS}
    assert max(worst(errors(comfy_weights(r), blended, made.base)).values()) < EXACT


@pytest.mark.parametrize("method", ["dora", "dvora"])
def test_comfyui_reads_our_kohya_dora_file_approximately(made, comfy, method):
    """It divides by ‖W0‖_row, not ‖W0 + ΔW‖_row: every adapted weight is off (measured 0.2 to 0.5 here)."""
    r = comfy.apply_lora(export(made, method, "kohya"), made.base)
    assert r.not_loaded == []
    errs = errors(comfy_weights(r), ours(made, method), made.base)
    assert set(errs) == set(COMPONENTS) and min(best(errs).values()) > 0.05, best(errs)


@pytest.mark.parametrize("method", ["magnitude", "lora", "dora_in"])
def test_comfyui_applies_our_kohya_file_exactly_where_its_formula_is_right(made, comfy, method):
    """ΔW = 0 (magnitude-only), no magnitude (LoRA), input axis (it normalises W0 + ΔW there)."""
    r = comfy.apply_lora(export(made, method, "kohya"), made.base)
    assert r.not_loaded == []
    assert max(worst(errors(comfy_weights(r), ours(made, method), made.base)).values()) < EXACT


def lora_part_only(made, method: str, scale: float | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """W0 + s·B·A of every adapted weight (s = alpha / r unless given): what a loader that drops the DoRA
    magnitude computes."""
    pipe = load_pipeline(made.model)
    load_adapter(pipe, adapter(made, method))
    out = {}
    for comp in COMPONENTS:
        module = getattr(pipe, comp)
        out[comp] = {
            f"{n}.weight": merged_weight(
                a.base.weight, a.lora_A, a.lora_B, a.scaling if scale is None else scale
            ).detach()
            for n, a in adapter_modules(module)
        }
    return out


def test_comfyui_reads_a_diffusers_file_without_magnitudes_and_unet_attention(made, comfy):
    """Its key map has today's diffusers spelling for no UNet attention layer (only ``….processor.to_q``), for
    the other UNet layers (feed-forward here) and the text encoders it has; magnitudes it reads as dora_scale
    only, and alpha from ``<key>.alpha`` only (not from diffusers' metadata): scale 1, i.e. alpha = rank."""
    file = export(made, "dora", "diffusers")  # pytorch_lora_weights.safetensors
    keys = load_file(str(file)).keys()
    r = comfy.apply_lora(file, made.base)
    attention = {k for k in keys if k.startswith("unet.") and (".attn1." in k or ".attn2." in k)}
    magnitudes = {k for k in keys if "lora_magnitude_vector" in k}
    assert set(r.not_loaded) == attention | magnitudes and attention and magnitudes
    got = comfy_weights(r)
    assert not any(".attn1." in k or ".attn2." in k for k in got["unet"])  # attention stays the base model
    unet = errors(got, ours(made, "dora"), made.base)["unet"]
    assert sum(e == 1.0 for e in unet) == sum(k.endswith("lora.down.weight") for k in attention)
    errs = errors(got, lora_part_only(made, "dora", scale=1.0), made.base)  # the rest: W0 + B·A, no magnitude, no alpha
    assert max(e for e in errs["unet"] if e != 1.0) < EXACT
    assert max(max(errs["text_encoder"]), max(errs["text_encoder_2"])) < EXACT
    assert min(best(errors(got, ours(made, "dora"), made.base)).values()) > 0.05


def test_comfyui_key_conversions_read_our_merged_single_file(made, comfy):
    """ComfyUI's checkpoint loader needs its whole model code (not in the fixture), but the key conversions it
    applies to an SDXL checkpoint are there: UNet SGM names (``unet_to_diffusers``, ComfyUI's UNet uses them as
    they are) and CLIP-G's OpenCLIP layout (``clip_text_transformers_convert``, with the prefixes that ComfyUI's
    SDXL model definition passes it); CLIP-L only changes prefix. Through them the file holds our W'."""
    c = comfy.import_comfy()
    sd = load_file(str(export(made, "dora", "merged-single")))
    to_sgm = c.utils.unet_to_diffusers(comfy.unet_config_from_diffusers(made.base["unet"]))
    got = {"unet": {k: sd["model.diffusion_model." + v] for k, v in to_sgm.items() if k in made.base["unet"]}}
    clip = c.utils.state_dict_prefix_replace(
        dict(sd), {"conditioner.embedders.0.transformer.text_model": "clip_l.transformer.text_model"}
    )
    clip = c.utils.clip_text_transformers_convert(clip, "conditioner.embedders.1.model.", "clip_g.transformer.")
    for comp, prefix in comfy.CLIP_PREFIX.items():
        got[comp] = {
            k: clip[prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k)]
            for k in made.base[comp]
            if k.endswith(".weight")
        }
    errs = errors(got, ours(made, "dora"), made.base)
    assert set(errs) == set(COMPONENTS) and max(worst(errs).values()) < EXACT, worst(errs)


# --------------------------------------------------------------------------------------------
# LyCORIS, from PyPI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lycoris():
    return pytest.importorskip("lycoris.kohya", reason="lycoris-lora is in the test extra: pip install -e '.[test]'")


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for p in parents:
        if not hasattr(root, p):
            root.add_module(p, nn.Module())
        root = getattr(root, p)
    root.add_module(last, module)


def sd_scripts_names(pipe):
    """The modules of ``pipe`` under the names sd-scripts' SDXL models have (what LyCORIS's kohya network keys on):
    the UNet's transformer blocks (diffusers' own ``Transformer2DModel`` objects) at their SGM paths, CLIP-L with
    the ``text_model.`` level. The modules are ``pipe``'s own, so a merge changes ``pipe``'s weights."""
    unet = nn.Module()
    for name, m in pipe.unet.named_modules():
        if type(m).__name__ == "Transformer2DModel":
            _put(unet, sgm_unet_name(name), m)
    te1 = pipe.text_encoder
    if not hasattr(te1, "text_model"):  # transformers 5 dropped the level from CLIPTextModel
        te1 = nn.Module()
        te1.add_module("text_model", pipe.text_encoder)
    return unet, [te1, pipe.text_encoder_2]


def lycoris_merge(lycoris, made, file: Path, *, network_args: bool):
    """W' after LyCORIS merges ``file`` into the base. ``network_args``: build the network as sd-scripts does from the
    file's metadata (``create_network`` with ``ss_network_dim/alpha/args``, ``apply_to``, ``load_weights``), else from
    the weights alone (``create_network_from_weights``)."""
    pipe = load_pipeline(made.model)
    unet, tes = sd_scripts_names(pipe)
    tensors = load_file(str(file))
    if network_args:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        args = json.loads(meta["ss_network_args"])
        network = lycoris.create_network(
            1.0, int(meta["ss_network_dim"]), float(meta["ss_network_alpha"]), None, tes, unet, **args
        )
        network.apply_to(tes, unet, apply_text_encoder=True, apply_unet=True)
        info = network.load_weights(str(file))
        assert "unexpected keys" not in info, info["unexpected keys"][:5]  # every key of the file was taken
    else:
        network, _ = lycoris.create_network_from_weights(
            1.0, str(file), None, tes, unet, weights_sd=tensors, for_inference=True
        )
        assert len(network.unet_loras) + len(network.text_encoder_loras) == sum(
            k.endswith(".lora_down.weight") for k in tensors
        )
    network.merge_to(tes, unet, tensors, torch.float32, "cpu")
    return state_dicts(pipe)


@pytest.mark.parametrize("method", METHODS)
def test_lycoris_applies_the_kohya_export_exactly(made, lycoris, method):
    got = lycoris_merge(lycoris, made, export(made, method, "kohya"), network_args=True)
    errs = errors(got, ours(made, method), made.base)
    assert set(errs) == set(COMPONENTS)
    assert max(worst(errs).values()) < EXACT, worst(errs)


def test_the_kohya_export_declares_the_magnitude_axis_for_lycoris(made):
    for method, on_output in (("dora", "true"), ("dora_in", "false")):
        with safe_open(str(export(made, method, "kohya")), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "true", "wd_on_output": on_output}
        assert meta["ss_network_module"] == "lycoris.kohya"


@pytest.mark.parametrize("method", ["dora", "dvora", "magnitude", "lora"])
def test_lycoris_weights_loader_applies_the_output_axis_kohya_export_exactly(made, lycoris, method):
    got = lycoris_merge(lycoris, made, export(made, method, "kohya"), network_args=False)
    assert max(worst(errors(got, ours(made, method), made.base)).values()) < EXACT


def test_lycoris_weights_loader_assumes_the_output_axis(made, lycoris):
    """``create_network_from_weights`` builds every DoRA module on the output axis: a ``[1, in]`` file is refused
    (the network-args path above, told ``wd_on_output: false``, reads it exactly)."""
    with pytest.raises(RuntimeError):
        lycoris_merge(lycoris, made, export(made, "dora_in", "kohya"), network_args=False)


def test_lycoris_misreads_the_comfyui_export(made, lycoris):
    """The ComfyUI file's dora_scale is for ComfyUI's normalisation: LyCORIS must get the kohya file."""
    got = lycoris_merge(lycoris, made, export(made, "dora", "comfyui"), network_args=True)
    errs = errors(got, ours(made, "dora"), made.base)
    assert set(errs) == set(COMPONENTS) and min(best(errs).values()) > 0.05, best(errs)


# --------------------------------------------------------------------------------------------
# diffusers (the diffusers file itself: tests/test_formats.py, merged single file: tests/test_export.py)
# --------------------------------------------------------------------------------------------


def diffusers_fused(made, file: Path, scale: float = 1.0):
    pipe = load_pipeline(made.model)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=scale)
    pipe.unload_lora_weights()
    return state_dicts(pipe)


@pytest.mark.parametrize("method, fmt", [("dora", "kohya"), ("dora_in", "kohya"), ("dora", "comfyui")])
def test_diffusers_applies_only_the_lora_part_of_kohya_dora_files(made, method, fmt):
    """diffusers drops ``dora_scale`` of SDXL kohya files (with a warning): W0 + s·B·A, whichever the axis."""
    got = diffusers_fused(made, export(made, method, fmt))
    errs = errors(got, lora_part_only(made, method), made.base)
    assert set(errs) == set(COMPONENTS) and max(worst(errs).values()) < EXACT, worst(errs)
    assert min(best(errors(got, ours(made, method), made.base)).values()) > 0.05


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_diffusers_scale_is_ours_and_keeps_the_trained_magnitude(made, scale):
    """PEFT's scale (diffusers' ``lora_scale``, our ``load_adapter(scale=)``) scales the direction's update only:
    the trained magnitude stays applied, so scale 0 is the magnitude-only model, not the base model."""
    file = export(made, "dora", "diffusers")
    pipe = load_pipeline(made.model)
    load_adapter(pipe, file, scale=scale)
    ours_at = {
        c: {f"{n}.weight": a.adapted_weight().detach() for n, a in adapter_modules(getattr(pipe, c))}
        for c in COMPONENTS
    }
    got = diffusers_fused(made, file, scale)
    assert max(worst(errors(got, ours_at, made.base)).values()) < EXACT
    if scale == 0.0:  # m ⊙ W0 / ‖W0‖_row with the trained m
        magnitude_only = {
            c: {
                f"{n}.weight": merged_weight(a.base.weight, None, None, 0.0, a.magnitude).detach()
                for n, a in adapter_modules(getattr(pipe, c))
            }
            for c in COMPONENTS
        }
        assert max(worst(errors(got, magnitude_only, made.base)).values()) < EXACT


# --------------------------------------------------------------------------------------------
# Our own loader reads the ComfyUI file exactly, and only because the metadata says what it is
# --------------------------------------------------------------------------------------------


def test_load_adapter_reads_the_comfyui_export_exactly_by_its_metadata(made, tmp_path):
    file = export(made, "dora", "comfyui")
    pipe = load_pipeline(made.model)
    report = load_adapter(pipe, file)
    assert report.metadata["layout"] == "comfyui" and report.method == {c: "dora" for c in COMPONENTS}
    got = {
        c: {f"{n}.weight": a.adapted_weight().detach() for n, a in adapter_modules(getattr(pipe, c))}
        for c in COMPONENTS
    }
    assert (
        max(
            worst(
                errors(got, {c: {k: ours(made, "dora")[c][k] for k in got[c]} for c in COMPONENTS}, made.base)
            ).values()
        )
        < 1e-5
    )
    # without the metadata it is a plain kohya DoRA file, read by DoRA's definition: wrong by the normalisation
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(file)), str(stripped))
    pipe = load_pipeline(made.model)
    load_adapter(pipe, stripped)
    got = {
        c: {f"{n}.weight": a.adapted_weight().detach() for n, a in adapter_modules(getattr(pipe, c))}
        for c in COMPONENTS
    }
    assert (
        min(
            best(
                errors(got, {c: {k: ours(made, "dora")[c][k] for k in got[c]} for c in COMPONENTS}, made.base)
            ).values()
        )
        > 1e-3
    )


def test_the_comfyui_export_says_what_it_is_for(made):
    with safe_open(str(export(made, "dora", "comfyui")), "pt") as f:
        meta = f.metadata()
    ours_meta = json.loads(meta["dora_diffusion"])
    assert ours_meta["layout"] == "comfyui" and ours_meta["magnitude_axis"] == "out"
    assert ours_meta["comfyui"]["comfyui_commit"] == "a125cd84b054a57729b5eecab930ca9408719832"
    assert ours_meta["comfyui"]["eps"] == torch.finfo(torch.float32).eps
    assert "use the kohya export" in ours_meta["comfyui"]["not_for"] and "LyCORIS" in ours_meta["comfyui"]["not_for"]
    assert "15458" in meta["dora_diffusion_note"] and ours_meta["probe"]
    lora = load_file(str(export(made, "lora", "comfyui")))
    assert lora.keys() == load_file(str(export(made, "lora", "kohya"))).keys()  # LoRA: the kohya file
    assert all(torch.equal(v, load_file(str(export(made, "lora", "kohya")))[k]) for k, v in lora.items())


def test_diffusers_export_refuses_an_input_axis_adapter(made):
    with pytest.raises(AdapterFileError, match=r"input_axis\.safetensors: input-axis DoRA.*kohya or comfyui.*merged"):
        export_adapter(adapter(made, "dora_in"), "diffusers", made.root / "never", model=made.model)
    assert not (made.root / "never").exists()
    pipe = load_pipeline(made.model)
    load_adapter(pipe, adapter(made, "dora_in"))
    with pytest.raises(AdapterError, match=r"unet\.down_blocks\.\S+: input-axis DoRA"):
        save_adapter(pipe, made.root / "never")
    assert not (made.root / "never").exists()
