"""The DreamBooth loop on the tiny SDXL: it learns, resumes exactly, runs under 2 processes, refuses bad input."""

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora_diffusion import AdapterConfig, adapter_parameters, add_adapters, load_adapter
from dora_diffusion.cli import main
from dora_diffusion.config import ConfigError, TrainConfig
from dora_diffusion.losses import diffusion_loss
from dora_diffusion.train import batch_indices, encode_prompts, train
from helpers import free_port, unet_inputs


def quick(tiny_model, small_data, output, **kw):
    base = dict(
        data=small_data,
        prompt="a photo of sks toy",
        output=str(output),
        model=tiny_model,
        resolution=64,
        max_steps=4,
        validation_steps=0,
        num_validation_images=1,
        validation_inference_steps=2,
        report_to="none",
        learning_rate=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_learn_a_fixed_batch(tiny_components, method):
    """On one fixed batch (latents, noise, timesteps, prompt), the loss falls by a clear margin."""
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method=method, rank=8, targets="attn+ff"))
    unet.train()
    inputs = unet_inputs(unet, seed=5, size=8, batch=2)
    target = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.AdamW(adapter_parameters(unet), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = diffusion_loss(unet(**inputs).sample, target, None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # seen: 1.10 -> 0.75 (LoRA)


def test_batch_order_is_a_function_of_the_step():
    n, seen = 7, []
    for step in range(7):
        seen += [i for i, _ in batch_indices(0, step, 0, 1, 1, n)]
    assert sorted(seen) == list(range(n))  # one epoch = each image once
    two_ranks = [i for step in range(7) for r in range(2) for i, _ in batch_indices(0, step, r, 2, 1, n)]
    assert two_ranks[:7] == seen  # ranks split the same sequence
    assert batch_indices(1, 0, 0, 1, 7, n) != batch_indices(0, 0, 0, 1, 7, n)


def test_prompt_encoding_shapes(tiny_components):
    c = tiny_components
    embeds, pooled = encode_prompts(
        [c["text_encoder"], c["text_encoder_2"]],
        [c["tokenizer"], c["tokenizer_2"]],
        ["a photo of sks toy", "a dog"],
        "cpu",
    )
    assert embeds.shape == (2, 77, c["unet"].config.cross_attention_dim)
    assert pooled.shape == (2, c["text_encoder_2"].config.projection_dim)


def _adapter(path):
    return load_file(str(Path(path) / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_resume_is_exact(tiny_model, small_data, tmp_path):
    """N steps, stop, resume for N more == 2N steps straight (DoRA, dropout, warm-up schedule, accumulation)."""
    kw = dict(
        method="dora",
        dropout=0.1,
        lr_schedule="linear",
        lr_warmup_steps=2,
        gradient_accumulation=2,
        max_steps=6,
        checkpoint_steps=3,
        cache_latents=False,
        train_text_encoder=True,
    )
    straight = train(quick(tiny_model, small_data, tmp_path / "straight", **kw))
    stopped = train(quick(tiny_model, small_data, tmp_path / "resumed", **kw), should_stop=lambda step, loss: step == 3)
    assert stopped.stopped and stopped.steps == 3
    assert not (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").exists()
    resumed = train(quick(tiny_model, small_data, tmp_path / "resumed", resume="latest", **kw))
    a, b = _adapter(straight.output), _adapter(resumed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final_loss == straight.final_loss
    # and training moved the adapter: it is not the initial one
    assert any(k.endswith("lora.up.weight") and a[k].abs().sum() > 0 for k in a)


def test_stop_keeps_a_checkpoint_and_resume_checks_the_config(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    result = train(
        quick(tiny_model, small_data, out, method="lora", max_steps=5), should_stop=lambda step, _loss: step == 2
    )
    assert result.stopped and (out / "checkpoints" / "checkpoint-2" / "state.json").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    with pytest.raises(ConfigError, match="resume: method is 'dora'.*'lora'"):
        train(quick(tiny_model, small_data, out, method="dora", max_steps=5, resume="latest"))


@pytest.mark.slow
def test_cli_end_to_end_and_both_loaders(tiny_model, small_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "cli-run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'data = "{small_data}"\nprompt = "a photo of sks toy"\nmethod = "lora"\nrank = 4\n'
        'max-steps = 100\nresolution = 64\nreport_to = "tensorboard"\n'
    )
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--method",
            "dora",
            "--max-steps",
            "3",
            "--model",
            tiny_model,
            "--output",
            str(out),
            "--validation-steps",
            "2",
            "--validation-inference-steps",
            "2",
            "--checkpoint-steps",
            "2",
            "--learning-rate",
            "0.01",
        ]
    )
    assert code == 0
    resolved = json.loads((out / "training_config.json").read_text())
    assert resolved["method"] == "dora" and resolved["max_steps"] == 3 and resolved["rank"] == 4  # CLI wins, file fills
    assert (out / "README.md").read_text().count("load_lora_weights") == 1
    assert sorted(p.name for p in (out / "validation").iterdir()) == [  # 2 images (seeds 0, 1) at steps 2 and 3
        "step000002_seed0.png",
        "step000002_seed1.png",
        "step000003_seed0.png",
        "step000003_seed1.png",
    ]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    base_out = ours.unet(**unet_inputs(ours.unet, size=8)).sample
    report = load_adapter(ours, out)
    assert report.method == {"unet": "dora"} and report.rank == {"unet": 4}
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    theirs.load_lora_weights(str(out))
    with torch.no_grad():
        a = ours.unet(**unet_inputs(ours.unet, size=8)).sample
        b = theirs.unet(**unet_inputs(theirs.unet, size=8)).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, base_out.detach(), atol=1e-5)
    # the ComfyUI/Forge file, written by default; the card says which file goes where
    comfy = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    assert load_adapter(comfy, out / "comfyui" / "cli-run.safetensors").metadata["layout"] == "comfyui"
    with torch.no_grad():
        torch.testing.assert_close(comfy.unet(**unet_inputs(comfy.unet, size=8)).sample, a, rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert (
        "| ComfyUI, Forge | `comfyui/cli-run.safetensors`" in card
        and "--format kohya" in card
        and "merged-single" in card
    )


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


@pytest.mark.slow
def test_two_process_cpu_run(tiny_model, small_data, tmp_path):
    """Two ranks under `accelerate launch` on the CPU (gloo), on a free port. accelerate's `--cpu`
    launcher starts one process unless MPI is set up; `--multi_gpu` starts two with torchrun, and the
    trainer forms a gloo group on the CPU when there is no CUDA. A run still going after the deadline
    fails with every worker's Python stacks (faulthandler, on SIGABRT) in the message."""
    import signal
    import time

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--multi_gpu",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "dora_diffusion.cli",
        "train",
        "--data",
        small_data,
        "--prompt",
        "a photo of sks toy",
        "--model",
        tiny_model,
        "--output",
        str(out),
        "--resolution",
        "64",
        "--max-steps",
        "3",
        "--validation-steps",
        "0",
        "--num-validation-images",
        "1",
        "--validation-inference-steps",
        "2",
        "--report-to",
        "none",
        "--method",
        "dora",
        "--learning-rate",
        "0.01",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        hung = proc.poll() is None
        if hung:
            for pid in _descendants(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGABRT)  # faulthandler prints the worker's stacks
            time.sleep(10)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log_path.read_text()
    assert not hung, "still running after 300 s; the log's end:\n" + output[-6000:]
    assert proc.returncode == 0, output[-4000:]
    assert output.count("final loss") == 2  # both ranks returned from train()
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["num_processes"] == 2 and ranks["in_sync"] and len(set(ranks["adapter_checksums"])) == 1
    assert len(list(out.glob("*.safetensors"))) == 1
    assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2


def test_existing_output_is_never_silently_overwritten(tiny_model, small_data, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(
        ["train", "--data", small_data, "--prompt", "a photo of sks toy", "--output", str(out), "--model", tiny_model]
    )
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_bad_input_is_a_clear_error(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["train", "--data", str(empty), "--prompt", "p", "--output", str(tmp_path / "o1"), "--model", tiny_model])
        == 2
    )
    assert str(empty) in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                str(empty),
                "--prompt",
                "p",
                "--output",
                str(tmp_path / "o2"),
                "--model",
                str(tmp_path / "nope"),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "vera"])
    assert main(["train", "--data", str(empty), "--prompt", "p", "--rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["train", "--data", str(empty), "--prompt", "p", "--resolution", "100"]) == 2
    assert "resolution" in capsys.readouterr().err
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("learning_rat = 1e-4\n")
    assert main(["train", "--config", str(bad_cfg)]) == 2
    assert "learning_rat" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                str(empty),
                "--prompt",
                "p",
                "--output",
                str(tmp_path / "o3"),
                "--resume",
                "latest",
                "--model",
                tiny_model,
            ]
        )
        == 2
    )
    assert "no checkpoint" in capsys.readouterr().err


def test_corrupt_images_are_skipped_and_named(tiny_model, small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = train(quick(tiny_model, str(data), tmp_path / "out", max_steps=1, num_validation_images=1))
    assert result.adapter_file.is_file()


@pytest.mark.parametrize(
    "options",
    [
        {"snr_gamma": 5.0, "noise_offset": 0.05},
        {"mixed_precision": "bf16", "gradient_checkpointing": True},
        {"method": "magnitude", "cache_latents": False, "batch_size": 2},
        {"method": "dvora", "policy": None, "lr_schedule": "cosine", "lr_warmup_steps": 1},
        {"method": "dora", "policy": "ff=magnitude", "targets": "attn+ff", "train_text_encoder": True},
    ],
    ids=["min-snr+offset", "bf16+checkpointing", "magnitude", "dvora", "policy+te"],
)
def test_training_options_run_and_save(tiny_model, small_data, tmp_path, options):
    result = train(quick(tiny_model, small_data, tmp_path / "run", max_steps=2, **options))
    assert result.adapter_file.is_file() and math.isfinite(result.final_loss)
    pipe_cfg = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert all(pipe_cfg[k] == v for k, v in options.items())


def test_v_prediction_target(tiny_components):
    from diffusers import DDPMScheduler

    from dora_diffusion.losses import training_target

    sched = DDPMScheduler.from_config({**tiny_components["scheduler"].config, "prediction_type": "v_prediction"})
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    v = training_target(sched, latents, noise, t)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - s * latents)
    eps = DDPMScheduler.from_config(tiny_components["scheduler"].config)
    assert training_target(eps, latents, noise, t) is noise


def test_prior_preservation_generates_class_images_once(tiny_model, small_data, tmp_path):
    class_dir = tmp_path / "class"
    kw = dict(class_prompt="a photo of a toy", class_data=str(class_dir), num_class_images=2, max_steps=2)
    train(quick(tiny_model, small_data, tmp_path / "a", **kw))
    made = sorted(class_dir.glob("*.png"))
    assert [p.name for p in made] == ["class_00000.png", "class_00001.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    train(quick(tiny_model, small_data, tmp_path / "b", **kw))  # kept for later runs: nothing regenerated
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps


class Crash(Exception):
    """Stands for a kill in the middle of a run (after a step's log row, before its checkpoint)."""


def _crash_at(step):
    def should_stop(done, loss):
        if done == step:
            raise Crash(done)
        return False

    return should_stop


def _log_steps(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_from_the_output_folder_alone_after_a_crash(tiny_model, small_data, tmp_path, capsys):
    """`train --output X --resume latest` (the help's example) continues with the run's own options; the
    log keeps one row per step; a --max-steps below the checkpoint's step is refused, nothing relabelled."""
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(
            quick(tiny_model, small_data, out, method="lora", rank=4, max_steps=4, checkpoint_steps=2),
            should_stop=_crash_at(3),
        )
    assert _log_steps(out) == [1, 2, 3]  # step 3 logged, its checkpoint never written
    assert not (out / ".train.lock").exists()  # released on the way out
    assert main(["train", "--output", str(out), "--resume", "latest"]) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    assert _log_steps(out) == [1, 2, 3, 4]  # the crashed run's step 3 dropped, not doubled
    resolved = json.loads((out / "training_config.json").read_text())
    assert (resolved["method"], resolved["rank"], resolved["data"]) == ("lora", 4, small_data)
    adapter = out / "pytorch_lora_weights.safetensors"
    before = adapter.read_bytes()
    assert main(["train", "--output", str(out), "--resume", "latest", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "max_steps" in err and "2" in err and "step 4" in err, err
    assert adapter.read_bytes() == before and _log_steps(out) == [1, 2, 3, 4]


def test_a_second_run_into_the_same_folder_stops_at_once(tiny_model, small_data, tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    lock = out / ".train.lock"
    lock.write_text(f"{os.getpid()}\n")  # a live run holds the folder
    with pytest.raises(ConfigError, match=f"{out}.*in use by another training run.*pid {os.getpid()}"):
        train(quick(tiny_model, small_data, out, max_steps=1))
    assert lock.read_text() == f"{os.getpid()}\n" and [p.name for p in out.iterdir()] == [".train.lock"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a lock left by a process that no longer runs (kill -9) is taken over
    lock.write_text(f"{gone.pid}\n")
    result = train(quick(tiny_model, small_data, out, max_steps=1))
    assert result.adapter_file.is_file() and f"process {gone.pid}" in capsys.readouterr().out
    assert not lock.exists()


def test_class_images_in_batches_keep_each_images_seed(tiny_pipe, tiny_model, small_data, tmp_path):
    """`sample_batch_size` changes how many images one pipeline call makes, not which image is which: image i
    starts from seed + 100000 + i either way (the batch's numerics may differ in the last bits only)."""
    import numpy as np
    from PIL import Image

    from dora_diffusion.validation import generate_class_images

    made = {}
    for batch in (1, 3):
        cfg = quick(tiny_model, small_data, tmp_path / "run", sample_batch_size=batch)
        folder = tmp_path / f"batch{batch}"
        generate_class_images(tiny_pipe, folder, "a photo of a toy", 4, 64, cfg)
        made[batch] = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))]
        assert [p.name for p in sorted(folder.glob("*.png"))] == [f"class_{i:05d}.png" for i in range(4)]
    for one, batched in zip(made[1], made[3], strict=True):
        assert np.abs(one - batched).max() <= 3
    assert np.abs(made[1][0] - made[1][1]).mean() > 10  # different seeds: different images


def test_sample_batch_size_must_be_positive(tiny_model, small_data, tmp_path):
    with pytest.raises(ConfigError, match="sample_batch_size"):
        quick(tiny_model, small_data, tmp_path / "run", sample_batch_size=0)


def test_runs_side_by_side_train_what_they_train_one_after_the_other(tiny_model, small_data, tmp_path):
    """The demo's two runs in processes of their own (``demo.train_side_by_side``) write the same adapters,
    bit for bit, as the same runs one after the other in this process: nothing in a run depends on what ran
    before it, and the logs go to one file per run."""
    from dora_diffusion.demo import _train_one, train_side_by_side

    def configs(root):
        return {m: quick(tiny_model, small_data, root / m, method=m, max_steps=3, seed=7) for m in ("lora", "dora")}

    first = []
    together = train_side_by_side(
        configs(tmp_path / "together"), tmp_path / "together", 1, on_first_done=lambda: first.append(1)
    )
    apart = {m: _train_one(c, None, torch.get_num_threads()) for m, c in configs(tmp_path / "apart").items()}
    assert first == [1]
    for method in ("lora", "dora"):
        assert together[method]["final_loss"] == apart[method]["final_loss"]
        a = load_file(together[method]["adapter"])
        b = load_file(apart[method]["adapter"])
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), key
        log = (tmp_path / "together" / f"{method}.log").read_text()
        assert f"training {method}" in log
