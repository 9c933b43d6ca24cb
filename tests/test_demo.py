"""`make demo` end to end on the embedded (pretrained) model, a few steps: what it writes and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dora_diffusion import demo
from dora_diffusion.models import EMBEDDED_MODEL_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="no embedded model"),
]


def test_demo_trains_both_methods_and_judges_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(demo, "JUDGED_SEEDS", 2)
    monkeypatch.setattr(demo, "NUM_CLASS_IMAGES", 3)
    summary = demo.run_demo(tmp_path / "demo", steps=6)
    assert set(summary["methods"]) == {"lora", "dora"}
    for method in ("lora", "dora"):
        assert (tmp_path / "demo" / method / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((tmp_path / "demo" / "class_images").glob("*.png"))) == 3  # made once, for both runs
    assert summary["trained"] in ("side by side, a core each", "one after the other")
    grid = Image.open(tmp_path / "demo" / "comparison.png")
    # 4 prompt rows and 3 columns of two 160 px cells each, plus the label margins
    assert grid.height > 4 * demo.CELL and grid.width > 3 * 2 * demo.CELL
    judged = json.loads((tmp_path / "demo" / "summary.json").read_text())["judged"]
    assert set(judged) == {"base", "LoRA", "DoRA"}
    for row in judged.values():
        assert row["instance"]["n"] == 2 and 0.0 <= row["instance"]["subject"] <= 1.0
        assert {"class", "subject_fidelity", "class_drift"} <= set(row)
    for label in ("LoRA", "DoRA"):
        row = judged[label]
        assert {"grass", "beach", "prompt_fidelity"} <= set(row) and "scene" in row["grass"]
        kept = (row["grass"]["scene"] + row["beach"]["scene"]) / 2
        assert row["prompt_fidelity"]["mean"] == pytest.approx(kept) and row["prompt_fidelity"]["n"] == 4
    assert "grass" not in judged["base"]  # the base is not asked for the scenes
    assert judged["base"]["class_drift"]["mean"] < 1e-6  # the base against itself
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for verdict in ("subject_fidelity_verdict", "class_drift_verdict", "prompt_fidelity_verdict"):
        assert summary[verdict].startswith(("DoRA ahead", "LoRA ahead", "within the spread")), verdict
    with pytest.raises(Exception, match="overwrite"):
        demo.run_demo(tmp_path / "demo", steps=6)
