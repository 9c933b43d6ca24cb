"""The Gradio app over HTTP: launched on localhost, driven with gradio_client like any API user."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import SAMPLE, load_app_module


def test_build_app_loads_nothing(tmp_path, tiny_model, monkeypatch):
    """Building the UI reads the model's config only; the pipeline loads on the first generation."""
    from dora_diffusion.engine import Engine

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # build_app points it at the workspace
    engine = Engine(model=str(tiny_model), workspace=tmp_path / "ws")
    load_app_module().build_app(engine)
    assert engine.pipe_loads == 0 and engine._pipe is None


def test_compare_endpoint_returns_three_images_and_repeats_with_the_seed(served):
    from gradio_client import Client

    app, engine = served
    client = Client(app.local_url, verbose=False)
    args = dict(
        prompt="a photo of sks toy",
        negative="",
        seed=7,
        steps=2,
        guidance=5.0,
        width=64,
        height=80,
        lora="demo/lora",
        lora_scale=1.0,
        dora="demo/dora",
        dora_scale=1.0,
    )
    first = client.predict(*args.values(), api_name="/compare")
    second = client.predict(*args.values(), api_name="/compare")
    *images, status = first
    assert len(images) == 3 and "Seed 7" in status
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    assert all(a.shape == (80, 64, 3) for a in arrays)
    assert not np.array_equal(arrays[1], arrays[2])
    for a, b in zip(images, second[:3], strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert engine.pipe_loads == 1


def test_errors_come_back_as_messages(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    app, _ = served
    client = Client(app.local_url, verbose=False)
    with pytest.raises(AppError, match="outside the workspace"):
        client.predict("a photo", "", 0, 2, 5.0, 64, 64, "../../etc", 1.0, "", 1.0, api_name="/compare")
    with pytest.raises(AppError, match="multiple of 8"):
        client.predict("a photo", "", 0, 2, 5.0, 68, 64, "", 1.0, "", 1.0, api_name="/compare")


def test_export_tab_names_the_file_for_each_tool(served):
    from gradio_client import Client

    from dora_diffusion.engine import EXPORT_FORMATS

    module = load_app_module()
    labels = {value: label for label, value in module.FORMATS}
    assert set(labels) == set(module.USAGE) == set(EXPORT_FORMATS)
    assert "ComfyUI" in labels["comfyui"] and "Forge" in labels["comfyui"]
    assert "LyCORIS" in labels["kohya"] and "ComfyUI" not in labels["kohya"] and "A1111" in labels["merged-single"]
    app, _ = served
    file, usage = Client(app.local_url, verbose=False).predict("demo/dora", "comfyui", "float32", api_name="/export")
    assert Path(file).name.endswith("-comfyui.safetensors") and "ComfyUI/models/loras/" in usage and "kohya" in usage


def test_gradio_keeps_its_files_in_the_workspace(served):
    """Gradio's temporary files (generated images, uploads, downloads) go to <workspace>/.gradio-tmp."""
    from gradio_client import Client

    app, engine = served
    tmp = engine.workspace / ".gradio-tmp"
    assert all(Path(block.GRADIO_CACHE) == tmp for block in app.blocks.values())
    client = Client(app.local_url, verbose=False)
    client.predict("a photo of sks toy", "", 11, 2, 5.0, 64, 64, "demo/lora", 1.0, "", 1.0, api_name="/compare")
    assert len(list(tmp.rglob("*.png"))) >= 2  # base and LoRA, as the server wrote them


def test_uploads_leave_nothing_in_gradio_temp(tmp_path, tiny_model):
    """Gradio's copies of uploaded files go once they are saved in uploads/ or refused; files elsewhere stay."""
    import shutil

    from dora_diffusion.data import DataError
    from dora_diffusion.engine import Engine

    module = load_app_module()
    engine = Engine(model=str(tiny_model), workspace=tmp_path / "ws")
    tmp = engine.workspace / ".gradio-tmp"
    uploaded = []
    for i, name in enumerate(["robot_01_wood_table.jpg", "robot_04_grass.jpg", "robot_04_grass.txt"]):
        (tmp / f"u{i}").mkdir(parents=True)
        uploaded.append(shutil.copy(SAMPLE / name, tmp / f"u{i}" / name))
    (tmp / "u3").mkdir()
    (tmp / "u3" / "notes.exe").write_bytes(b"MZ")  # refused: not an image or caption
    uploaded.append(tmp / "u3" / "notes.exe")
    folder, summary = module.receive_uploads(engine, uploaded, 64)
    assert "2 image(s) used" in summary and "notes.exe" in summary
    assert sorted(p.name for p in (engine.workspace / folder).iterdir()) == [
        "robot_01_wood_table.jpg",
        "robot_04_grass.jpg",
        "robot_04_grass.txt",
    ]
    assert list(tmp.iterdir()) == []
    (tmp / "u5").mkdir()
    (tmp / "u5" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        module.receive_uploads(engine, [tmp / "u5" / "broken.png"], 64)
    assert list(tmp.iterdir()) == []
    elsewhere = tmp_path / "mine.jpg"  # never Gradio's: kept
    shutil.copy(SAMPLE / "robot_01_wood_table.jpg", elsewhere)
    module.receive_uploads(engine, [elsewhere], 64)
    assert elsewhere.is_file()


def test_loss_curves_stay_distinguishable_when_they_coincide():
    """Same seed, same data order: LoRA's and DoRA's losses can be equal; both lines still show."""
    from dora_diffusion.engine import TrainProgress

    module = load_app_module()
    losses = [1.0 / s for s in range(1, 11)]
    p = TrainProgress(
        state="running", losses=[(m, s, loss) for m in ("lora", "dora") for s, loss in enumerate(losses, 1)]
    )
    fig = module.loss_figure(p)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"LoRA", "DoRA"}
    lora, dora = lines["LoRA"], lines["DoRA"]
    assert list(lora.get_ydata()) == list(dora.get_ydata()) == losses
    assert lora.get_linestyle() != dora.get_linestyle()
    assert lora.get_marker() != dora.get_marker() and lora.get_linewidth() > dora.get_linewidth()
    assert dora.get_zorder() > lora.get_zorder()  # the thin one on top of the wide one
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["LoRA", "DoRA"]
    assert module.loss_figure(TrainProgress(state="running")) is None


def test_cli_app_builds_and_launches_with_its_flags(tmp_path, tiny_model, monkeypatch, capsys):
    """``dora-diffusion app``: localhost by default, no share link unless asked, the workspace folder given."""
    import gradio as gr

    from dora_diffusion.cli import build_parser, main

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.share, args.outputs, args.model) == ("127.0.0.1", 7860, False, "outputs", None)
    launched = {}
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    assert (
        main(
            [
                "app",
                "--model",
                str(tiny_model),
                "--outputs",
                str(tmp_path / "ws"),
                "--port",
                "7999",
                "--share",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "torch threads: 1 (--threads)" in capsys.readouterr().out
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999 and launched["share"] is True
    assert launched["allowed_paths"] == [str((tmp_path / "ws" / "exports").resolve())]


def test_small_compare_images_are_enlarged_by_css_only():
    main = load_app_module()
    rule = next(line for line in main.CSS.splitlines() if "#compare-base img" in line)
    assert "#compare-dora img" in rule and "width: 100%" in rule


def test_internal_errors_are_logged_and_shown_as_internal(caplog):
    """A user's mistake comes back as its own message and is not logged; anything else (a ValueError from deep
    inside, say) is logged with its traceback and shown as an internal error, never as the user's mistake."""
    import gradio as gr

    from dora_diffusion.engine import EngineError

    module = load_app_module()

    def raises(error):
        @module.shown
        def action():
            raise error

        return action

    with caplog.at_level("ERROR", logger="dora_diffusion.app"):
        with pytest.raises(gr.Error, match="rank: must be in 1..128"):
            raises(EngineError("rank: must be in 1..128"))()
        assert not caplog.records
        with pytest.raises(gr.Error) as shown_error:
            raises(ValueError("too many values to unpack"))()
    assert "Internal error (ValueError: too many values to unpack)" in shown_error.value.message
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
