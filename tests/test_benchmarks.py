"""The benchmark scripts run, measure what they say and report it (tiny UNet, a step or two: no timing
is asserted, only that the measurement is of the right thing)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(args, tmp_path):
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_sampling_benchmark_times_equal_outputs(tmp_path):
    out = tmp_path / "s.json"
    _run(
        [BENCH / "bench_sampling.py", "--size", "tiny", "--resolution", "64", "--threads", "1", "--dtype", "float32"]
        + ["--rounds", "1", "--out", out],
        tmp_path,
    )
    r = json.loads(out.read_text())
    check = r["outputs_relative_to_mean_abs"]
    # merged DoRA computes what unmerged DoRA does (fp32 here), and the adapter is not the identity
    assert check["merged_vs_unmerged_mean_abs"] < 1e-4 * check["adapter_vs_base_mean_abs"]
    assert check["adapter_vs_base_mean_abs"] > 1e-3
    assert set(r["median_step_s"]) == {"base", "lora", "dora", "dora-merged", "base (phase 2)"}
    assert r["machine"]["cpu_flags"] is not None and "torch" in r["machine"]


@pytest.mark.parametrize("init", ["default", "fast"])
def test_training_benchmark_profiles_and_variants(tmp_path, init):
    out = tmp_path / "t.json"
    _run(
        [BENCH / "bench_adapters.py", "--size", "tiny", "--in-process", "--profile", "--steps", "1"]
        + ["--repeats", "1", "--threads", "1", "--init", init, "--variants", "ours-lora,ours-dora,ours-dora-exact"]
        + ["--out", out],
        tmp_path,
    )
    r = json.loads(out.read_text())
    assert r["config"]["init"] == init
    prof = {x["variant"]: x["profile"] for x in r["runs"]}
    assert "DoRAFunction" in prof["ours-dora"]["ops"] and "DoRAFunction" not in prof["ours-lora"]["ops"]
    assert "DoRAFunction" not in prof["ours-dora-exact"]["ops"]  # Eq. 6 runs through autograd's graph
    loss = {x["variant"]: x["loss"] for x in r["runs"]}
    assert all(v == v and v < 1e3 for v in loss.values()), loss  # finite: the fast init is a working net


def test_full_cpu_summary_from_results(tmp_path):
    """The summary table comes from the runs' JSON: two in-process pairs give the three ratios."""
    for name, pair in (("ours", "ours-lora,ours-dora"), ("peft", "ours-lora,peft-dora")):
        _run(
            [BENCH / "bench_adapters.py", "--size", "tiny", "--in-process", "--steps", "1", "--repeats", "1"]
            + ["--threads", "1", "--variants", pair, "--out", tmp_path / f"cpu-full-64-{name}.json"]
            + ["--resolution", "64"],
            tmp_path,
        )
    text = _run([BENCH / "full_cpu.py", "--summarize-only", "--out-dir", tmp_path], tmp_path)
    s = json.loads((tmp_path / "cpu-full-summary.json").read_text())
    row = s["training"][0]
    ours = json.loads((tmp_path / "cpu-full-64-ours.json").read_text())["variants"]
    assert row["ours_dora/ours_lora"] == pytest.approx(
        ours["ours-dora"]["median_step_s"] / ours["ours-lora"]["median_step_s"]
    )
    assert row["peft_dora/ours_dora"] == pytest.approx(row["peft_dora/ours_lora"] / row["ours_dora/ours_lora"])
    assert "| 64 px (8²) |" in text


def test_layer_benchmark_covers_every_attention_kind(tmp_path):
    out = tmp_path / "l.json"
    _run([BENCH / "bench_layers.py", "--resolution", "64", "--rounds", "1", "--out", out], tmp_path)
    layers = json.loads(out.read_text())["layers"]
    assert len(layers) == 5
    tails = [v for v in layers.values() if v["residual_tail"]]
    assert tails and all("dora-keep" in v["median_ms"] for v in tails)
    assert all(
        {"lora", "dora", "dora-cached", "dora-separate", "norm", "norm-fp32-copy"} <= set(v["median_ms"])
        for v in layers.values()
    )


def test_demo_recipe_joins_results_of_parallel_runs(tmp_path):
    """``--merge`` alone trains nothing: it joins other runs' rows (a later file's row replaces an earlier one of
    the same method:variant), keeps the ``--append`` file's rows and refuses files judged on other seeds."""

    def row(method, variant, subject):
        return {"method": method, "variant": variant, "subject": subject}

    kept, a, b = tmp_path / "all.json", tmp_path / "a.json", tmp_path / "b.json"
    kept.write_text(json.dumps({"seeds": [100, 131], "runs": [row("dora", "demo", 0.4), row("lora", "x", 0.1)]}))
    a.write_text(json.dumps({"seeds": [100, 131], "runs": [row("lora", "x", 0.2), row("dora", "y", 0.3)]}))
    b.write_text(json.dumps({"seeds": [100, 131], "runs": [row("dora", "y", 0.5)]}))
    _run([BENCH / "demo_recipe.py", "--out", kept, "--append", "--merge", a, "--merge", b], tmp_path)
    result = json.loads(kept.read_text())
    runs = {f"{r['method']}:{r['variant']}": r["subject"] for r in result["runs"]}
    assert runs == {"dora:demo": 0.4, "lora:x": 0.2, "dora:y": 0.5}
    assert 0.0 <= result["judge_reads_the_photos_as_the_subject"] <= 1.0
    assert "machine" in result
    b.write_text(json.dumps({"seeds": [0, 31], "runs": []}))
    out = subprocess.run(
        [sys.executable, BENCH / "demo_recipe.py", "--out", kept, "--append", "--merge", b],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert out.returncode != 0 and "seeds" in out.stderr
    assert json.loads(kept.read_text())["runs"] == result["runs"]  # nothing lost on the refusal
