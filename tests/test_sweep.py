"""``dora-diffusion sweep``: the table's arithmetic by hand, and a small sweep end to end on the embedded model."""

from __future__ import annotations

import json
import statistics

import pytest

from dora_diffusion import sweep
from dora_diffusion.config import ConfigError
from dora_diffusion.sweep import SweepConfig, markdown_table, run_sweep, summarise, verdicts
from helpers import SAMPLE


def _cell(method, rank, seed, fid, drift, step_ms=100.0):
    return {
        "method": method,
        "rank": rank,
        "seed": seed,
        "eval_seeds": 4,
        "step_ms": step_ms,
        "final_loss": 0.1,
        "trainable_parameters": 1000 * rank,
        "subject_fidelity": {"mean": fid, "std": 0.01, "n": 4},
        "drift": {"mean": drift, "std": 0.02, "n": 4},
    }


def _config(tmp_path, **kw):
    base = dict(
        output=str(tmp_path / "sweep"), data=str(SAMPLE), prompt="a photo of sks toy", class_prompt="a photo of a toy"
    )
    base.update(kw)
    return SweepConfig(**base)


def test_summary_is_mean_and_std_across_training_seeds(tmp_path):
    cfg = _config(tmp_path, ranks=(4,), seeds=(0, 1, 2))
    cells = [_cell("lora", 4, s, f, d) for s, f, d in ((0, 0.5, 0.1), (1, 0.6, 0.2), (2, 0.7, 0.3))]
    cells += [_cell("dora", 4, s, f, d) for s, f, d in ((0, 0.9, 0.1), (1, 0.91, 0.2), (2, 0.92, 0.3))]
    rows = summarise(cells, cfg)
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["subject_fidelity"]["mean"] == pytest.approx(0.6)
    assert lora["subject_fidelity"]["std"] == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))
    assert lora["subject_fidelity"]["n"] == 3 and lora["seeds"] == 3
    assert lora["trainable_parameters"]["mean"] == 4000
    lines = verdicts(rows)
    # DoRA 0.91 vs LoRA 0.6: 2 SE = 2 * sqrt(0.01²/3 + 0.1²/3) ≈ 0.116 < 0.31, so DoRA is ahead
    assert any(line.startswith("rank 4, subject fidelity: DoRA ahead") for line in lines)
    # drift identical per seed: within the spread
    assert any(line.startswith("rank 4, drift: within the spread") for line in lines)
    table = markdown_table(rows, lines)
    assert "base model" not in table
    with_base = markdown_table(rows, lines, base={"subject_fidelity": {"mean": 0.5, "std": 0.1, "n": 4}})
    assert "| base model | | 0.500 ± 0.100 |" in with_base
    assert "| lora | 4 | 0.600 ± 0.100 |" in table
    assert "across 3 training seeds" in table


def test_bad_sweep_settings_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="methods"):
        _config(tmp_path, methods=("lora", "bogus"))
    with pytest.raises(ConfigError, match="ranks"):
        _config(tmp_path, ranks=(0,))
    with pytest.raises(ConfigError, match="eval_seeds"):
        _config(tmp_path, eval_seeds=1)
    with pytest.raises(ConfigError, match="class_prompt"):
        _config(tmp_path, class_prompt="")


def test_a_model_without_judge_needs_dino(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="dino"):
        run_sweep(_config(tmp_path, model=str(tiny_model)), progress=lambda *_: None)
    assert not (tmp_path / "sweep" / "cells").exists()  # refused before training anything


@pytest.mark.slow
def test_small_sweep_end_to_end_and_resumes(tmp_path, monkeypatch):
    cfg = _config(
        tmp_path,
        methods=("lora", "dora"),
        ranks=(2,),
        seeds=(0, 1),
        steps=2,
        num_class_images=2,
        eval_seeds=2,
        inference_steps=2,
        scene_prompts={"sks toy on the grass": "grass"},
        threads=1,
    )
    summary = run_sweep(cfg, progress=lambda *_: None)
    out = tmp_path / "sweep"
    for name in ("sweep.json", "sweep.csv", "sweep.md", "sweep.png", "base.json"):
        assert (out / name).is_file(), name
    assert len(summary["cells"]) == 4
    for cell in summary["cells"]:
        assert cell["steps"] == 2 and cell["eval_seeds"] == 2
        assert -1.0 <= cell["subject_fidelity"]["mean"] <= 1.0
        assert 0.0 <= cell["subject_drawn"]["mean"] <= 1.0
        assert 0.0 <= cell["prompt_fidelity"]["mean"] <= 1.0
        assert cell["prompt_fidelity_kind"] == "scene kept (judge)"
        assert cell["drift"]["mean"] >= -1e-9
    assert [r["method"] for r in summary["rows"]] == ["lora", "dora"]
    assert json.loads((out / "sweep.json").read_text())["rows"][0]["seeds"] == 2

    # a second run reads every cell back: nothing is trained
    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was retrained")

    monkeypatch.setattr(sweep, "_train_cell", no_training)
    again = run_sweep(cfg, progress=lambda *_: None)
    assert [c["subject_fidelity"] for c in again["cells"]] == [c["subject_fidelity"] for c in summary["cells"]]

    # other settings: a finished cell is not thrown away unless asked
    stale = dict(
        methods=("lora",),
        ranks=(2,),
        seeds=(0,),
        steps=3,
        num_class_images=2,
        eval_seeds=2,
        inference_steps=2,
        threads=1,
    )
    with pytest.raises(ConfigError, match="lora-r2-seed0.*other settings"):
        run_sweep(_config(tmp_path, **stale), progress=lambda *_: None)
    assert (out / "cells" / "lora-r2-seed0" / "cell.json").is_file()
    calls = []

    def stop(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("stop")

    monkeypatch.setattr(sweep, "_train_cell", stop)
    with pytest.raises(RuntimeError, match="stop"):
        run_sweep(_config(tmp_path, overwrite=True, **stale), progress=lambda *_: None)
    assert len(calls) == 1


def test_the_subject_folder_counts_by_content_not_path(tmp_path):
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(SAMPLE, copy)
    a, b = _config(tmp_path), _config(tmp_path, data=str(copy))
    assert a.cell_settings() == b.cell_settings()
    (copy / "robot_01_wood_table.jpg").write_bytes(b"changed")
    assert a.cell_settings() != _config(tmp_path, data=str(copy)).cell_settings()


def test_sweep_cells_train_the_demos_loss_weighting(tmp_path, monkeypatch):
    """A cell trains with the demo's min-SNR-γ (2) (and the weighting is part of what a finished cell is
    matched on); `--snr-gamma 0` turns it off."""
    import dora_diffusion.train as train_module
    from dora_diffusion.cli_parser import build_parser
    from dora_diffusion.demo import demo_config

    seen = []
    monkeypatch.setattr(train_module, "train", lambda config: seen.append(config))
    cfg = _config(tmp_path)
    sweep._train_cell(cfg, "dora", 4, 0, tmp_path / "run", tmp_path / "class")
    assert seen[0].snr_gamma == demo_config(tmp_path, "dora", 10).snr_gamma == 2.0
    assert cfg.cell_settings()["snr_gamma"] == 2.0
    assert _config(tmp_path, snr_gamma=None).cell_settings() != cfg.cell_settings()
    from collections import defaultdict

    parser = build_parser(defaultdict(lambda: lambda args: 0))
    assert parser.parse_args(["sweep"]).snr_gamma == 2.0
    assert parser.parse_args(["sweep", "--snr-gamma", "0"]).snr_gamma == 0.0
