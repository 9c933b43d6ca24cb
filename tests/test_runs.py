"""The run folder's one owner (``dora_diffusion.runs``): names, the base-model marker, adapter metadata,
the training log, checkpoint discovery and validation images; and a run on the embedded model read back
by analysis, export, the CLI and the app's engine from its adapter file alone."""

import ast
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dora_diffusion import AdapterConfig, add_adapters, runs, save_adapter
from dora_diffusion.formats import AdapterFileError
from helpers import REPO, SAMPLE

PACKAGE = REPO / "dora_diffusion"


def write_adapter(tiny_components, path: Path, metadata: dict | None = None) -> Path:
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method="dora", rank=2, targets="to_q"))
    return save_adapter({"unet": unet}, path, metadata=metadata)


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """A one-step DoRA run on the embedded model (``model=None``), as ``dora-diffusion train`` makes it."""
    from dora_diffusion.config import TrainConfig
    from dora_diffusion.train import train

    tmp = tmp_path_factory.mktemp("embedded-run")
    data = tmp / "data"
    data.mkdir()
    for p in sorted(SAMPLE.glob("*.jpg"))[:2]:
        shutil.copy(p, data / p.name)
    out = tmp / "run"
    train(
        TrainConfig(
            data=str(data),
            prompt="a photo of sks toy",
            output=str(out),
            model=None,
            method="dora",
            rank=2,
            targets="to_q,to_v",
            max_steps=1,
            validation_steps=0,
            num_validation_images=1,
            validation_inference_steps=2,
            report_to="none",
            learning_rate=1e-2,
        )
    )
    return out


# --------------------------------------------------------------------------------------------
# The marker: a run on the embedded model, read back from its adapter file alone
# --------------------------------------------------------------------------------------------


def test_a_bare_adapter_file_of_an_embedded_model_run_is_analysed_on_the_embedded_model(embedded_run, tmp_path):
    """What a run on the default model records as its base model is read back as that model, not passed on
    as a model id (which no hub or folder has)."""
    from dora_diffusion.analysis import analyze_runs, describe_run

    bare = tmp_path / "my-adapter.safetensors"
    shutil.copy(embedded_run / "pytorch_lora_weights.safetensors", bare)  # no training_config.json beside it
    assert describe_run(bare).model is None
    alone = analyze_runs([bare], layers=["to_q"])
    in_run = analyze_runs([embedded_run], layers=["to_q"])
    assert alone.rows and [(r.layer, r.delta_m, r.delta_d) for r in alone.rows] == [
        (r.layer, r.delta_m, r.delta_d) for r in in_run.rows
    ]


def test_every_reader_resolves_the_embedded_marker(embedded_run, tmp_path):
    from dora_diffusion.cli_commands import recorded_model
    from dora_diffusion.engine import Engine
    from dora_diffusion.models import embedded_model

    bare = tmp_path / "adapter" / runs.ADAPTER_NAME
    bare.parent.mkdir()
    shutil.copy(runs.adapter_file(embedded_run), bare)
    assert runs.adapter_metadata(bare)["base_model"] == runs.EMBEDDED_MODEL  # what the file says
    for path in (embedded_run, runs.adapter_file(embedded_run), runs.comfyui_file(embedded_run), bare, bare.parent):
        assert runs.base_model(path) is None, path
        assert runs.base_model_folder(path) == embedded_model()
    assert recorded_model(None, [str(bare)]) is None
    listed = {r.name: r for r in Engine(workspace=tmp_path).list_runs()}
    assert listed["adapter"].base_model is None and listed["adapter"].steps == 1 and listed["adapter"].method == "dora"


def test_a_recorded_model_id_is_read_back_as_it_was_given(tiny_components, tmp_path):
    file = write_adapter(
        tiny_components, tmp_path / "a.safetensors", {"base_model": runs.model_record("org/some-sdxl")}
    )
    assert runs.base_model(file) == "org/some-sdxl"
    assert runs.model_record(None) == runs.EMBEDDED_MODEL and runs.model_from_record(runs.EMBEDDED_MODEL) is None
    assert runs.model_from_record("") is None and runs.model_from_record(None) is None


def test_the_run_folder_as_training_writes_it(embedded_run):
    config = runs.read_run_config(embedded_run)
    assert (
        config["model"] is None and config["max_steps"] == 1 and config["resolution"] == 64
    )  # the embedded model's size
    assert [r["step"] for r in runs.read_log(embedded_run)] == [1]
    assert [(v.step, v.seed) for v in runs.validation_images(embedded_run)] == [(1, 0)]
    assert runs.adapter_file(embedded_run).is_file() and runs.comfyui_file(embedded_run).is_file()
    assert (embedded_run / runs.CARD_NAME).is_file() and not (embedded_run / runs.LOCK_NAME).exists()
    meta = runs.adapter_metadata(embedded_run)
    assert meta["trained_steps"] == 1 and meta["seed"] == 0 and meta["instance_prompt"] == "a photo of sks toy"
    assert meta["components"]["unet"]["method"] == "dora"


# --------------------------------------------------------------------------------------------
# Adapter metadata
# --------------------------------------------------------------------------------------------


def test_adapter_metadata_round_trip(tiny_components, tmp_path):
    class Config:  # what run_metadata reads of a TrainConfig
        model, prompt, max_steps, seed = None, "a photo of sks toy", 7, 3

    recorded = runs.run_metadata(Config, 64)
    file = write_adapter(tiny_components, tmp_path / "run", recorded)
    assert file == runs.adapter_file(tmp_path / "run")
    meta = runs.adapter_metadata(tmp_path / "run")  # a folder: its adapter file
    assert recorded == {
        "base_model": runs.EMBEDDED_MODEL,
        "instance_prompt": "a photo of sks toy",
        "trained_steps": 7,
        "resolution": 64,
        "seed": 3,
    }
    assert {k: meta[k] for k in recorded} == recorded
    assert meta["components"]["unet"]["rank"] == 2


def test_adapter_metadata_of_other_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert runs.adapter_metadata(plain) == {}
    for i, entry in enumerate(("not json", "[1, 2]")):
        odd = tmp_path / f"odd{i}.safetensors"
        save_file({"x": torch.zeros(1)}, str(odd), metadata={"dora_diffusion": entry})
        assert runs.adapter_metadata(odd) == {}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(AdapterFileError, match="broken.safetensors"):
        runs.adapter_metadata(broken)
    with pytest.raises(AdapterFileError, match="missing"):
        runs.adapter_metadata(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------
# Config, log, checkpoints, validation images
# --------------------------------------------------------------------------------------------


def test_run_config_round_trip(tmp_path):
    assert runs.read_run_config(tmp_path) is None
    runs.write_run_config(tmp_path, {"model": "m", "max_steps": 3})
    assert runs.config_file(tmp_path) == tmp_path / "training_config.json"
    assert runs.read_run_config(tmp_path) == {"model": "m", "max_steps": 3}
    assert runs.base_model(tmp_path) == "m"


def test_training_log_append_read_truncate(tmp_path):
    assert runs.read_log(tmp_path) == []
    for step in (1, 2, 3):
        runs.append_log(tmp_path, {"step": step, "loss": 1.0 / step})
    with runs.log_file(tmp_path).open("a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    assert [r["step"] for r in runs.read_log(tmp_path)] == [1, 2, 3]
    runs.truncate_log(tmp_path, 2)
    assert runs.read_log(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert runs.log_file(tmp_path).read_text().endswith("\n")
    runs.append_log(tmp_path, {"step": 3, "loss": 0.25})
    assert [r["step"] for r in runs.read_log(tmp_path)] == [1, 2, 3]
    runs.truncate_log(tmp_path / "nowhere", 1)  # no log: nothing to do


def test_checkpoint_discovery(tmp_path):
    assert runs.checkpoints(tmp_path) == [] and runs.latest_checkpoint(tmp_path) is None
    for step in (9, 10, 2):
        folder = runs.checkpoint_dir(tmp_path, step)
        folder.mkdir(parents=True)
        runs.write_checkpoint_state(folder, step, {"model": None, "method": "dora"})
    runs.checkpoint_dir(tmp_path, 11).mkdir()  # incomplete: no state.json yet
    runs.checkpoint_staging_dir(tmp_path, 12).mkdir()
    (tmp_path / runs.CHECKPOINT_DIR / "checkpoint-old").mkdir()
    assert [p.name for p in runs.checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-11",
    ]
    latest = runs.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "checkpoint-10" and runs.checkpoint_step(latest) == 10
    assert runs.is_checkpoint(latest) and not runs.is_checkpoint(runs.checkpoint_dir(tmp_path, 11))
    assert runs.read_checkpoint_state(latest) == {"step": 10, "config": {"model": None, "method": "dora"}}
    assert runs.run_of_checkpoint(latest) == tmp_path and runs.base_model(latest) is None
    assert runs.step_in_path(latest / "unet") == 10 and runs.step_in_path(tmp_path) is None
    assert runs.rng_file(latest, 1) == latest / "rng-1.pt"


def test_validation_image_names(tmp_path):
    path = runs.validation_image_path(tmp_path, 100, 0)
    assert path == tmp_path / "validation" / "step000100_seed0.png"
    assert runs.parse_validation_name(path.name) == (100, 0)
    assert (
        runs.parse_validation_name("step000100_seed0.png.tmp") is None
        and runs.parse_validation_name("grid.png") is None
    )
    assert runs.validation_images(tmp_path) == []
    path.parent.mkdir()
    for step, seed in ((100, 10), (100, 2), (25, 0)):
        runs.validation_image_path(tmp_path, step, seed).write_bytes(b"")
    (path.parent / ".step000200_seed0.png.tmp").write_bytes(b"")
    (path.parent / "stepwise.png").write_bytes(b"")
    assert [(v.step, v.seed, v.path.name) for v in runs.validation_images(tmp_path)] == [
        (25, 0, "step000025_seed0.png"),
        (100, 2, "step000100_seed2.png"),
        (100, 10, "step000100_seed10.png"),
    ]


def test_class_images_sit_beside_the_run(tmp_path):
    folder = runs.class_images_dir(tmp_path / "out" / "dora", "A photo of a toy!")
    assert folder == tmp_path / "out" / "class_images" / "a_photo_of_a_toy"


# --------------------------------------------------------------------------------------------
# One owner
# --------------------------------------------------------------------------------------------


def test_no_other_module_spells_the_run_folder_names():
    names = {
        runs.CONFIG_NAME,
        runs.LOG_NAME,
        runs.STATE_NAME,
        runs.CHECKPOINT_ADAPTER_NAME,
        runs.RANKS_NAME,
        runs.LOCK_NAME,
        runs.EMBEDDED_MODEL,
        "tiny-sdxl (embedded)",
        "checkpoint-*",
        "step*.png",
    }
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.name == "runs.py":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{file.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_analysis_and_engine_do_not_import_the_training_loop():
    code = (
        "import sys, dora_diffusion.analysis, dora_diffusion.engine, dora_diffusion.export, dora_diffusion.runs; "
        "print('dora_diffusion.train' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr
