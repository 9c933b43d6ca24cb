"""`dora-diffusion compare` end to end on the tiny model: fair runs, grid, analysis, summary."""

import json
import shutil
from pathlib import Path

import pytest

from dora_diffusion.cli import main
from dora_diffusion.compare import PeakMemory, summary_table
from helpers import SAMPLE


def test_peak_memory_sees_an_allocation():
    import torch

    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x.add_(1)
        import time

        time.sleep(0.1)
    assert mem.peak_bytes is not None and mem.peak_bytes >= 48 * 2**20
    del x


def test_summary_table_columns():
    row = {
        "label": "dora r4",
        "trainable_parameters": 1234,
        "adapter_file_bytes": 4096,
        "median_step_ms": 12.3,
        "peak_memory_mib": None,
        "final_loss": 0.5,
        "delta_d_delta_m_correlation": -0.5,
    }
    table = summary_table([row])
    assert "| dora r4 | 1,234 | 4 KiB | 12 ms | n/a | 0.5000 | -0.50 |" in table


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    from dora_diffusion.models import build_tiny_sdxl

    model = str(build_tiny_sdxl(tmp_path / "tiny"))
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(SAMPLE.glob("*.jpg"))[:3]:
        shutil.copy(p, data / p.name)
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--data",
            str(data),
            "--prompt",
            "a photo of sks toy",
            "--model",
            model,
            "--output",
            str(out),
            "--methods",
            "lora,dora,magnitude",
            "--ranks",
            "2,4",
            "--max-steps",
            "4",
            "--resolution",
            "64",
            "--validation-steps",
            "0",
            "--num-validation-images",
            "1",
            "--validation-inference-steps",
            "2",
            "--sample-steps",
            "2",
            "--sample-size",
            "64",
            "--report-to",
            "none",
            "--learning-rate",
            "0.01",
            "--validation-prompts",
            "a photo of sks toy|sks toy in the snow",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    labels = [r["label"] for r in summary["runs"]]
    assert labels == ["lora r2", "lora r4", "dora r2", "dora r4", "magnitude"]
    by = {r["label"]: r for r in summary["runs"]}
    assert (
        by["dora r4"]["trainable_parameters"]
        > by["lora r4"]["trainable_parameters"]
        > by["lora r2"]["trainable_parameters"]
    )
    assert by["magnitude"]["trainable_parameters"] < by["lora r2"]["trainable_parameters"]
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.width >= 6 * 64 and grid.height >= 2 * 64  # base + 5 runs, 2 prompts
    assert (out / "analysis" / "decomposition.png").is_file() and (out / "summary.md").read_text().count("|") > 20
    # identical settings: same seed, steps and data in every run's resolved config
    cfgs = [json.loads((Path(r["output"]) / "training_config.json").read_text()) for r in summary["runs"]]
    assert len({(c["seed"], c["max_steps"], c["data"], c["learning_rate"]) for c in cfgs}) == 1
    # a random model has no judge: the metrics are skipped, and say why
    assert "judge" in summary["metrics_skipped"] and "metrics" not in by["lora r2"]


@pytest.mark.slow
def test_compare_reports_metrics_on_the_embedded_model(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(SAMPLE.glob("*.jpg"))[:3]:
        shutil.copy(p, data / p.name)
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--data",
            str(data),
            "--prompt",
            "a photo of sks toy",
            "--output",
            str(out),
            "--methods",
            "lora,dora",
            "--ranks",
            "2",
            "--max-steps",
            "2",
            "--validation-steps",
            "0",
            "--num-validation-images",
            "1",
            "--validation-inference-steps",
            "2",
            "--sample-steps",
            "2",
            "--report-to",
            "none",
            "--class-prompt",
            "a photo of a toy",
            "--num-class-images",
            "2",
            "--validation-prompts",
            "a photo of sks toy|sks toy on the grass",
            "--eval-seeds",
            "3",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for run in summary["runs"]:
        m = run["metrics"]
        assert m["embedding"] == "judge" and m["eval_seeds"] == 3
        assert m["subject_fidelity"]["n"] == 3 and -1 <= m["subject_fidelity"]["mean"] <= 1
        assert m["prompt_fidelity_kind"] == "scene kept (judge)" and m["prompt_fidelity"]["n"] == 3
        assert m["drift"]["n"] == 3 and m["drift"]["mean"] >= -1e-9
    assert "drift" not in summary["base_metrics"]  # drift is measured from the base
    assert len(summary["metric_verdicts"]) == 4 and all("dora r2" in v for v in summary["metric_verdicts"])
    table = (out / "summary.md").read_text()
    assert "| base |" in table and "subject fidelity (judge)" in table
