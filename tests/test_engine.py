"""The app's engine on the tiny SDXL: one base load, adapters swapped in place, same seed same images,
paths confined to the workspace, bad uploads refused, training in the background with a clean cancel."""

import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from dora_diffusion.data import DataError
from dora_diffusion.engine import Engine, EngineBusy, EngineError, TrainRequest
from dora_diffusion.sampling import SampleSettings
from helpers import SAMPLE, write_adapter

SMALL = SampleSettings("a photo of sks toy", seed=3, steps=2, guidance=5.0, width=64, height=72)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_components):
    ws = tmp_path_factory.mktemp("workspace")
    write_adapter(tiny_components, ws / "runs" / "lora", "lora", seed=1)
    write_adapter(tiny_components, ws / "runs" / "deep" / "dora", "dora", seed=2)
    return ws


@pytest.fixture(scope="module")
def engine(tiny_model, workspace):
    return Engine(model=tiny_model, workspace=workspace)


def pixels(image):
    return np.asarray(image.convert("RGB"))


def test_compare_loads_the_base_once_and_swaps_adapters(engine, monkeypatch):
    import dora_diffusion.models as models

    loads = []
    real = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    first = engine.compare(SMALL, lora="runs/lora", dora="runs/deep/dora", lora_scale=1.0, dora_scale=1.0)
    unet = engine.pipe.unet
    second = engine.compare(SMALL, lora="runs/lora", dora="runs/deep/dora")
    assert len(loads) == 1 and engine.pipe_loads == 1 and engine.pipe.unet is unet
    assert [g.label for g in first] == ["base", "LoRA", "DoRA"]
    assert all(g.image.size == (64, 72) and g.seconds > 0 for g in first)
    for a, b in zip(first, second, strict=True):  # same seed: the same images
        assert np.array_equal(pixels(a.image), pixels(b.image))
    base, lora, dora = (pixels(g.image) for g in first)  # different adapters: different images
    assert not np.array_equal(base, lora) and not np.array_equal(base, dora) and not np.array_equal(lora, dora)
    # the pipeline is left as the base model: no adapter stays behind
    from dora_diffusion.layers import adapter_modules

    assert not list(adapter_modules(engine.pipe.unet))
    base_only = engine.compare(SMALL)
    assert len(base_only) == 1 and np.array_equal(pixels(base_only[0].image), base)


def test_scale_zero_lora_is_the_base_and_other_seed_differs(engine):
    base, lora = engine.compare(SMALL, lora="runs/lora", lora_scale=0.0)
    assert np.array_equal(pixels(base.image), pixels(lora.image))
    other = engine.compare(SampleSettings(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(pixels(other[0].image), pixels(base.image))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(width=100), "multiple of 8"),
        (dict(height=2048), "64..1536"),
        (dict(steps=0), "steps"),
        (dict(guidance=99.0), "guidance"),
        (dict(prompt="  "), "prompt"),
    ],
)
def test_bad_settings_are_refused(engine, settings, message):
    with pytest.raises(EngineError, match=message):
        engine.compare(SampleSettings(**{**SMALL.__dict__, **settings}))


def test_runs_are_listed_and_preselected(engine, workspace):
    runs = {r.name: r for r in engine.list_runs()}
    assert set(runs) == {"runs/lora", "runs/deep/dora"}
    assert runs["runs/lora"].method == "lora" and runs["runs/deep/dora"].method == "dora"
    assert runs["runs/lora"].rank == 4 and "LoRA" in runs["runs/lora"].label
    assert engine.default_runs() == ("runs/lora", "runs/deep/dora")


def test_safe_path_keeps_paths_in_the_workspace(engine, workspace, tmp_path, monkeypatch):
    assert engine.safe_path("runs/lora") == (workspace / "runs" / "lora").resolve()
    assert engine.safe_path(str(workspace / "runs")) == (workspace / "runs").resolve()
    monkeypatch.chdir(workspace.parent)  # a path spelled from the working directory, as the CLI user sees it
    assert engine.safe_path(f"{workspace.name}/runs/lora", must_exist=True) == (workspace / "runs" / "lora").resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "link").symlink_to(outside)
    for text in ("../x", "runs/../../x", "/etc/passwd", str(outside), "~", "link/x"):
        with pytest.raises(EngineError, match="outside the workspace"):
            engine.safe_path(text)
    for text in ("", "   ", None):
        with pytest.raises(EngineError, match="empty"):
            engine.safe_path(text)
    with pytest.raises(EngineError, match="does not exist"):
        engine.safe_path("runs/nothing", must_exist=True)
    with pytest.raises(EngineError, match="outside the workspace"):
        engine.compare(SMALL, lora="../../etc")
    with pytest.raises(EngineError, match="no .safetensors"):
        engine.compare(SMALL, lora="runs")


def test_uploads_are_checked_like_training_folders(engine, tmp_path):
    good = [SAMPLE / "robot_01_wood_table.jpg", SAMPLE / "robot_04_grass.jpg", SAMPLE / "robot_04_grass.txt"]
    junk = tmp_path / "notes.exe"
    junk.write_bytes(b"MZ")
    folder, summary = engine.save_uploads([*good, junk], resolution=64)
    assert folder.parent == engine.workspace / "uploads"
    assert sorted(p.name for p in folder.iterdir()) == [
        "robot_01_wood_table.jpg",
        "robot_04_grass.jpg",
        "robot_04_grass.txt",
    ]
    assert "2 image(s) used" in summary and "notes.exe" in summary

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    before = set((engine.workspace / "uploads").iterdir())
    with pytest.raises(DataError, match="No usable images.*broken.png"):
        engine.save_uploads([broken], resolution=64)
    assert set((engine.workspace / "uploads").iterdir()) == before  # the failed folder is removed again
    with pytest.raises(EngineError, match="no files"):
        engine.save_uploads([])
    with pytest.raises(EngineError, match="outside the workspace"):
        engine.scan("/tmp")


def test_training_runs_in_the_background_and_its_runs_appear(tiny_model, tmp_path):
    engine = Engine(model=tiny_model, workspace=tmp_path / "ws")
    folder, _ = engine.save_uploads(sorted(SAMPLE.glob("robot_0[1-3]*")), resolution=64)
    job = engine.start_training(
        TrainRequest(
            data=engine.relative(folder),
            prompt="a photo of sks toy",
            name="toy",
            method="dora",
            steps=2,
            resolution=64,
            validation_steps=1,
            num_validation_images=1,
            validation_inference_steps=2,
            report_to="none",
        )
    )
    assert job.wait(120)
    p = engine.training_progress()
    assert p.state == "finished", p.message
    assert [(m, s) for m, s, _ in p.losses] == [("dora", 1), ("dora", 2)] and p.step == 2 and p.its > 0
    assert [c for _, c in p.validation] == ["dora · step 1 · seed 0", "dora · step 2 · seed 0"]
    assert [r.name for r in engine.list_runs()] == ["toy/dora"]
    with pytest.raises(EngineError, match="already exists"):  # nothing is overwritten
        engine.train_configs(TrainRequest(data=engine.relative(folder), prompt="a photo of sks toy", name="toy"))


def test_cancel_stops_cleanly_and_keeps_a_checkpoint(tiny_model, tmp_path):
    engine = Engine(model=tiny_model, workspace=tmp_path / "ws")
    folder, _ = engine.save_uploads(sorted(SAMPLE.glob("robot_0[1-3]*")), resolution=64)
    request = TrainRequest(
        data=engine.relative(folder),
        prompt="a photo of sks toy",
        name="long",
        method="both",
        steps=5000,
        resolution=64,
        validation_steps=0,
        num_validation_images=1,
        validation_inference_steps=2,
        report_to="none",
    )
    job = engine.start_training(request)
    with pytest.raises(EngineBusy, match="already going"):
        engine.start_training(request)
    deadline = time.time() + 120
    while engine.training_progress().step < 1 and job.running and time.time() < deadline:
        time.sleep(0.2)
    with pytest.raises(EngineBusy, match="training run"):
        engine.compare(SMALL)
    assert engine.cancel_training()
    assert job.wait(120)
    p = engine.training_progress()
    assert p.state == "cancelled" and "checkpoint kept" in p.message, p.message
    step = job.results[0].steps
    assert (
        job.results[0].stopped and (tmp_path / "ws" / "long" / "lora" / "checkpoints" / f"checkpoint-{step}").is_dir()
    )
    assert not (tmp_path / "ws" / "long" / "dora").exists()  # 'both' stops before DoRA starts
    assert not engine.training and not engine.cancel_training()
    assert engine.compare(SMALL)  # the device is free again


def test_training_requests_are_bounded(engine):
    ok = dict(data="runs", prompt="a photo of sks toy")
    for change, message in [
        (dict(rank=0), "rank"),
        (dict(steps=10**6), "steps"),
        (dict(learning_rate=0), "learning rate"),
        (dict(batch_size=99), "batch size"),
        (dict(method="full"), "method"),
        (dict(resolution=100), "resolution"),
        (dict(data="../x"), "outside the workspace"),
        (dict(name="../escape"), "outside the workspace"),
        (dict(name="uploads/x"), "own folders"),
    ]:
        with pytest.raises(EngineError, match=message):
            engine.train_configs(TrainRequest(**{**ok, **change}))


def test_export_zips_folders_and_never_overwrites(engine, monkeypatch):
    calls = []

    def fake_export(adapter, format, out, *, model=None, dtype="float32"):
        calls.append((Path(adapter).name, format, dtype))
        out = Path(out)
        if format == "merged-folder":
            (out / "unet").mkdir(parents=True)
            (out / "unet" / "weights.safetensors").write_bytes(b"x")
            return out
        out.write_bytes(b"y")
        return out

    monkeypatch.setitem(sys.modules, "dora_diffusion.export", types.SimpleNamespace(export_adapter=fake_export))
    first = engine.export("runs/lora", "kohya", "float16")
    second = engine.export("runs/lora", "kohya", "float16")
    assert first.parent == engine.exports_dir and first != second and first.exists() and second.exists()
    archive = engine.export("runs/deep/dora", "merged-folder")
    import zipfile

    assert archive.suffix == ".zip" and zipfile.ZipFile(archive).namelist() == [
        f"{archive.stem}/unet/weights.safetensors"
    ]
    assert calls[0] == ("lora", "kohya", "float16")
    with pytest.raises(EngineError, match="format"):
        engine.export("runs/lora", "ckpt")
    with pytest.raises(EngineError, match="outside the workspace"):
        engine.export("../..", "kohya")


def test_merged_folder_export_is_one_zip_with_normal_permissions(engine, monkeypatch):
    """The folder a merged export writes (made by mkdtemp: 0700, its files 0600) is zipped with
    rw-r--r-- files and removed: one download, nothing left beside it."""
    import os
    import stat
    import zipfile

    def fake_export(adapter, format, out, *, model=None, dtype="float32"):
        out = Path(out)
        (out / "unet").mkdir(parents=True)
        for folder in (out, out / "unet"):
            os.chmod(folder, 0o700)
        for name in ("unet/diffusion_pytorch_model.safetensors", "model_index.json"):
            (out / name).write_bytes(b"w")
            os.chmod(out / name, 0o600)
        return out

    monkeypatch.setitem(sys.modules, "dora_diffusion.export", types.SimpleNamespace(export_adapter=fake_export))
    archive = engine.export("runs/lora", "merged-folder")
    assert not archive.with_suffix("").exists() and archive.is_file()
    with zipfile.ZipFile(archive) as z:
        modes = {i.filename: stat.S_IMODE(i.external_attr >> 16) for i in z.infolist()}
    assert modes == {
        f"{archive.stem}/model_index.json": 0o644,
        f"{archive.stem}/unet/diffusion_pytorch_model.safetensors": 0o644,
    }
    assert stat.S_IMODE(archive.stat().st_mode) == 0o644


def test_analysis_of_runs_in_the_workspace(engine, workspace):
    png, text = engine.analyze(["runs/lora", "runs/deep/dora"])
    assert png.is_file() and png.resolve().is_relative_to(workspace.resolve())
    assert png.with_suffix(".csv").is_file() and "Pearson r" in text
    with pytest.raises(EngineError):
        engine.analyze(["../elsewhere"])
    with pytest.raises(EngineError, match="at least one"):
        engine.analyze([])


# --------------------------------------------------------------------------------------------
# Errors: only our own types are the user's; an internal error is logged with its traceback
# --------------------------------------------------------------------------------------------


def test_only_our_error_types_are_user_errors():
    from dora_diffusion.analysis import AnalysisError
    from dora_diffusion.config import ConfigError
    from dora_diffusion.engine import is_user_error, user_message
    from dora_diffusion.formats import AdapterFileError
    from dora_diffusion.models import ModelNotFoundError

    for error in (
        EngineError("rank: must be in 1..128"),
        EngineBusy("busy"),
        ConfigError("max_steps: bad"),
        DataError("No usable images"),
        AdapterFileError("x.safetensors: broken"),
        AnalysisError("run: nothing"),
        ModelNotFoundError("Model 'x' is not in the cache"),
    ):
        assert is_user_error(error) and user_message(error) == str(error), error
    for error in (ValueError("math domain error"), KeyError("unet"), FileExistsError("x"), RuntimeError("boom")):
        assert not is_user_error(error), error
        message = user_message(error)
        assert message.startswith(f"Internal error ({type(error).__name__}") and "server log" in message


def _job(tmp_path, fake_train, monkeypatch, steps=4):
    """A TrainingJob over ``fake_train`` in place of the loop (nothing is trained)."""
    import dora_diffusion.train
    from dora_diffusion.config import TrainConfig
    from dora_diffusion.engine import TrainingJob

    monkeypatch.setattr(dora_diffusion.train, "train", fake_train)
    configs = [
        TrainConfig(data=str(SAMPLE), prompt="a photo of sks toy", output=str(tmp_path / m), method=m, max_steps=steps)
        for m in ("lora", "dora")
    ]
    released = []
    job = TrainingJob(configs, release=lambda: released.append(True)).start()
    assert job.wait(60) and released == [True]
    return job


@pytest.mark.parametrize(
    "error, internal",
    [(ValueError("an internal slip"), True), (KeyError("unet"), True), (DataError("No usable images in x"), False)],
)
def test_a_failed_training_job_reports_internal_errors_as_such(tmp_path, monkeypatch, caplog, error, internal):
    def fake_train(config, should_stop=None, progress=None):
        raise error

    with caplog.at_level("WARNING", logger="dora_diffusion.engine"):
        job = _job(tmp_path, fake_train, monkeypatch)
    p = job.progress()
    assert p.state == "failed"
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    if internal:
        assert p.message.startswith(f"Training failed: Internal error ({type(error).__name__}")
        assert len(logged) == 1 and "Traceback" in logged[0].getMessage()
    else:
        assert p.message == f"Training failed: {error}" and not logged


def test_training_progress_comes_from_the_trainers_reports(tmp_path, monkeypatch):
    """Steps, losses, speed and validation images as the trainer reports them: no run file is read."""
    from dora_diffusion import runs
    from dora_diffusion.train import StepReport, TrainResult

    def fake_train(config, should_stop=None, progress=None):
        out = Path(config.output)
        for step in range(1, config.max_steps + 1):
            images = (runs.validation_image_path(out, step, 0),) if step == 2 else ()
            progress(StepReport(step, 1.0 / step, 0.5, images))
        progress(StepReport(config.max_steps, 0.25, None, (runs.validation_image_path(out, config.max_steps, 0),)))
        return TrainResult(out, runs.adapter_file(out), config.max_steps, 0.25, 0.5, 10)

    job = _job(tmp_path, fake_train, monkeypatch)
    p = job.progress()
    assert p.state == "finished" and p.method == "dora" and (p.step, p.max_steps, p.loss) == (4, 4, 0.25)
    assert [(m, s) for m, s, _ in p.losses] == [(m, s) for m in ("lora", "dora") for s in (1, 2, 3, 4)]
    assert p.its == 2.0 and p.eta_seconds == 0.0
    assert [c for _, c in p.validation] == [f"{m} · step {s} · seed 0" for m in ("lora", "dora") for s in (2, 4)]
    assert not any(tmp_path.rglob("*"))  # read from the reports, not from files


@pytest.mark.slow
def test_measure_scores_base_lora_and_dora_on_the_embedded_model(tmp_path):
    engine = Engine(model=None, workspace=tmp_path / "ws")  # the embedded model: its judge scores
    folder, _ = engine.save_uploads(sorted(SAMPLE.glob("robot_0[1-3]*")), resolution=64)
    job = engine.start_training(
        TrainRequest(
            data=engine.relative(folder),
            prompt="a photo of sks toy",
            name="m",
            method="both",
            steps=2,
            validation_steps=1,
            num_validation_images=1,
            validation_inference_steps=2,
            report_to="none",
        )
    )
    assert job.wait(300) and engine.training_progress().state == "finished"
    settings = SampleSettings("a photo of sks toy", seed=0, steps=2, guidance=5.0, width=64, height=64)
    text = engine.score(settings, lora="m/lora", dora="m/dora", eval_seeds=3)
    assert "on 3 seeds (judge embedding; subject photos: `" in text
    for row in ("| base |", "| LoRA |", "| DoRA |"):
        assert row in text
    assert "subject fidelity" in text and "drift from the base" in text
    assert sum(line.startswith("- ") for line in text.splitlines()) == 3  # one verdict per metric
    assert "within the spread" in text or "ahead" in text
    with pytest.raises(EngineError, match="seeds to measure"):
        engine.score(settings, lora="m/lora", eval_seeds=1)
    with pytest.raises(EngineError, match="choose a LoRA or a DoRA"):
        engine.score(settings)


def test_measure_needs_a_judge_or_dino(engine):
    from dora_diffusion.config import ConfigError

    with pytest.raises(ConfigError, match="dino: .* has no toy-world judge"):
        engine.score(SMALL, lora="runs/lora", eval_seeds=2)
