"""The weight-decomposition analysis (paper §3.2): ΔM and ΔD on constructed weights with known
answers, the adapter decompositions, and the whole analysis on two tiny training runs."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dora_diffusion.analysis import (
    AnalysisError,
    adapter_decomposition,
    analyze,
    analyze_runs,
    analyze_unet_folder,
    delta_d,
    delta_m,
    direction_change,
    layer_decomposition,
    linear_fit,
    pearson,
)
from dora_diffusion.layers import merged_weight
from helpers import SAMPLE

OUT, IN = 12, 40  # out != in: measuring over the wrong axis breaks every known answer below
# What the result may differ by from the fp64 oracle on the same (rounded) values: fp32 accumulation.
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)]


def _w0(seed=0, out=OUT, inp=IN):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _oracle(w, w0):
    """ΔM, ΔD the textbook way, in fp64."""
    w, w0 = w.double(), w0.double()
    return ((w.norm(dim=1) - w0.norm(dim=1)).abs().mean().item(), (1 - F.cosine_similarity(w, w0, dim=1)).mean().item())


def _rotate_rows(w0, theta):
    """Each row turned by ``theta[n]`` in a plane through it, its norm kept: ``cos(W_n, W0_n) = cos θ_n``."""
    g = torch.randn(w0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    unit = w0 / w0.norm(dim=1, keepdim=True)
    ortho = g - (g * unit).sum(dim=1, keepdim=True) * unit
    ortho = ortho / ortho.norm(dim=1, keepdim=True)
    return w0.norm(dim=1, keepdim=True) * (torch.cos(theta)[:, None] * unit + torch.sin(theta)[:, None] * ortho)


# ---- ΔM and ΔD on constructed weights ---------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_row_rescale_changes_magnitude_only(dtype, tol):
    w0 = _w0()
    c = torch.linspace(0.5, 1.8, OUT, dtype=torch.float64)
    expected_m = ((c - 1).abs() * w0.norm(dim=1)).mean().item()
    w, w0 = (c[:, None] * w0).to(dtype), w0.to(dtype)
    oracle_m, oracle_d = _oracle(w, w0)
    assert delta_m(w, w0) == pytest.approx(oracle_m, rel=tol)
    assert abs(delta_d(w, w0) - oracle_d) < tol
    # the known answer, up to the inputs' own rounding
    assert delta_m(w, w0) == pytest.approx(expected_m, rel=1e-12 if dtype == torch.float64 else 2e-2)
    assert delta_d(w, w0) < (1e-15 if dtype == torch.float64 else 1e-4)
    assert isinstance(delta_m(w, w0), float) and isinstance(delta_d(w, w0), float)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_row_rotation_changes_direction_only(dtype, tol):
    w0 = _w0()
    theta = torch.linspace(0.05, 1.2, OUT, dtype=torch.float64)
    expected_d = (1 - torch.cos(theta)).mean().item()
    w, w0 = _rotate_rows(w0, theta).to(dtype), w0.to(dtype)
    oracle_m, oracle_d = _oracle(w, w0)
    assert delta_d(w, w0) == pytest.approx(oracle_d, rel=tol)
    assert abs(delta_m(w, w0) - oracle_m) < tol * w0.double().norm(dim=1).mean()
    assert delta_d(w, w0) == pytest.approx(expected_d, rel=1e-12 if dtype == torch.float64 else 1e-2)
    assert delta_m(w, w0) < (1e-12 if dtype == torch.float64 else 2e-2 * w0.double().norm(dim=1).mean())


def test_small_angles_keep_their_digits_in_fp32():
    """1 − cos θ for θ = 1e-4 is 5e-9, below fp32's resolution of cos itself (6e-8)."""
    w0 = _w0(inp=64)
    theta = torch.full((OUT,), 1e-4, dtype=torch.float64)
    w = _rotate_rows(w0, theta).float()
    assert delta_d(w, w0.float()) == pytest.approx(5e-9, rel=1e-2)
    assert delta_d(w, w0) == pytest.approx(5e-9, rel=1e-2)  # fp32 against fp64: fp64


def test_zero_rows_have_no_direction():
    w0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert direction_change(w, w0).tolist() == [0.0, 1.0, 1.0]


def test_pearson_and_line_of_constructed_points():
    x = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert pearson(x, [1 - 2 * v for v in x]) == pytest.approx(-1.0)
    assert pearson(x, [3 * v for v in x]) == pytest.approx(1.0)
    assert linear_fit(x, [1 - 2 * v for v in x]) == pytest.approx((-2.0, 1.0))
    assert abs(pearson(x, [0.0, 1.0, 0.0, 1.0, 0.0])) < 0.5
    assert math.isnan(pearson(x, [2.0] * 5)) and math.isnan(pearson([1.0], [2.0]))
    assert all(math.isnan(v) for v in linear_fit([1.0, 1.0], [2.0, 3.0]))


# ---- adapters ---------------------------------------------------------------------------------


def _adapter(seed=1, rank=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, IN, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(OUT, rank, generator=g, dtype=torch.float64) * 0.3
    m = _w0().norm(dim=1) * (1 + 0.2 * torch.randn(OUT, generator=g, dtype=torch.float64))
    return a.to(dtype), b.to(dtype), m.to(dtype)


def test_magnitude_only_leaves_direction_exactly():
    w0 = _w0()
    _, _, m = _adapter()
    d = layer_decomposition(w0, magnitude=m)
    assert d.delta_d == 0.0
    assert d.delta_m == pytest.approx((m - w0.norm(dim=1)).abs().mean().item(), rel=1e-12)
    merged = merged_weight(w0, None, None, 0.0, m)
    assert delta_d(merged, w0) < 1e-15 and d.delta_m == pytest.approx(delta_m(merged, w0), rel=1e-12)
    flipped = m.clone()
    flipped[3] = -flipped[3]  # a row whose magnitude turned negative points the other way
    assert layer_decomposition(w0, magnitude=flipped).delta_d == pytest.approx(2 / OUT)
    assert delta_d(merged_weight(w0, None, None, 0.0, flipped), w0) == pytest.approx(2 / OUT)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_dora_magnitude_from_m_equals_merged_row_norms(dtype, rel):
    w0 = _w0().to(dtype)
    a, b, m = _adapter(dtype=dtype)
    d = layer_decomposition(w0, a, b, 0.5, m)
    merged = merged_weight(w0, a, b, 0.5, m)  # ‖W'_n‖ = m_n
    assert d.delta_m == pytest.approx(delta_m(merged, w0), rel=rel)
    assert d.delta_m == pytest.approx(delta_m(m, w0), rel=rel)
    # the magnitude does not turn rows: DoRA's direction is that of W0 + s·B·A
    assert d.delta_d == pytest.approx(delta_d(merged_weight(w0, a, b, 0.5), w0), rel=max(rel, 1e-5))


def test_lora_decomposition_is_that_of_the_merged_weight():
    w0 = _w0()
    a, b, _ = _adapter()
    d = layer_decomposition(w0, a, b, 2.0)
    assert (d.delta_m, d.delta_d) == pytest.approx(_oracle(w0 + 2.0 * b @ a, w0), rel=1e-10)
    with pytest.raises(ValueError):
        layer_decomposition(w0)
    with pytest.raises(ValueError, match="magnitude"):
        layer_decomposition(w0, a, b, 1.0, torch.ones(OUT + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="lora_A"):
        layer_decomposition(w0[:, :-1], a, b, 1.0)


def _by_hand(adapter, method):
    """``W'`` of an adapter from its weights and the paper's formulas (not through the adapter's own code)."""
    w0 = adapter.base.weight.detach().double()
    if method == "magnitude":
        return adapter.magnitude.detach()[:, None] * w0 / w0.norm(dim=1, keepdim=True)
    if method == "dvora":  # A' = diag(d)·A, B' = diag(b)·B
        a = adapter.vera_d.detach()[:, None] * adapter.vera_A
        b = adapter.vera_b.detach()[:, None] * adapter.vera_B
    else:
        a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    v = w0 + (8.0 / 4) * b @ a  # s = alpha / r
    if method == "lora":
        return v
    m = adapter.magnitude.detach()
    if method == "dora_in":  # one magnitude per input column
        return v * (m / v.norm(dim=0))[None, :]
    return m[:, None] * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("method", ["lora", "dora", "magnitude", "dvora", "dora_in"])
def test_adapter_modules_decompose_as_their_adapted_weight(method):
    """Every adapter class, against its W' computed by hand from its weights (and the textbook ΔM, ΔD)."""
    from dora_diffusion.layers import ADAPTER_CLASSES

    base = torch.nn.Linear(IN, OUT, dtype=torch.float64)
    adapter = ADAPTER_CLASSES[method](base, rank=4, alpha=8.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if not name.startswith("base."):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64) * p.abs().mean().clamp_min(0.1))
    d = adapter_decomposition(adapter)
    expected_m, expected_d = _oracle(_by_hand(adapter, method), base.weight)
    assert d.delta_m == pytest.approx(expected_m, rel=1e-10)
    assert d.delta_d == pytest.approx(expected_d, rel=1e-10, abs=1e-15)
    assert (d.delta_d == 0.0) == (method == "magnitude") and d.delta_m > 0


# ---- the plot ---------------------------------------------------------------------------------


def _texts_overlapping(fig):
    """Pairs of titles, axis labels, axis multipliers (offset texts) and x tick labels whose drawn boxes overlap."""
    import itertools

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [
        (f"panel {i} {kind}", t)
        for i, ax in enumerate(fig.axes)
        for kind, t in (
            ("title", ax.title),
            ("x label", ax.xaxis.label),
            ("y label", ax.yaxis.label),
            ("x multiplier", ax.xaxis.offsetText),
            ("y multiplier", ax.yaxis.offsetText),
        )
        if t.get_visible() and t.get_text()
    ]
    texts += [
        (f"panel {i} x tick {t.get_text()}", t)
        for i, ax in enumerate(fig.axes)
        for t in ax.get_xticklabels()
        if t.get_visible() and t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]
    ]
    return [
        (a, b)
        for (a, s), (b, t) in itertools.combinations(texts, 2)
        if s.get_window_extent(renderer).overlaps(t.get_window_extent(renderer))
    ]


@pytest.mark.parametrize(
    "name, delta_m, delta_d",
    [
        ("run-dora", lambda i: 1e-3 * (1 + i % 7), lambda i: 1e-4 * (1 + i % 5)),  # ×10⁻³ / ×10⁻⁴ multipliers
        (
            "outputs/a-rather-long-run-name-for-toy-dora-r16@checkpoint-1000",
            lambda i: 0.2 * i,
            lambda i: 0.5 + 1e-9 * i,
        ),
        ("run-lora", lambda i: 12345.0 + 1e-3 * i, lambda i: 1e-4 * i),  # large values, tiny spread
    ],
    ids=["small", "long-name-flat-x", "large-flat-y"],
)
def test_plot_titles_and_axis_labels_do_not_overlap(name, delta_m, delta_d):
    from dora_diffusion.analysis import AnalysisResult, DecompositionRow, decomposition_figure

    rows = [
        DecompositionRow(f"{name}-{k}", method, step, "unet", f"layer{i}", delta_m(i), delta_d(i))
        for k, method in enumerate(("lora", "dora", "dora", "lora", "dora"))
        for step in (2, 4)
        for i in range(12)
    ]
    fig = decomposition_figure(AnalysisResult(rows))
    assert len(fig.axes) == 5  # two rows of panels: the second row's titles meet the first row's x labels
    assert _texts_overlapping(fig) == []


# ---- runs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny model and a LoRA and a DoRA run of 4 steps, checkpointed at steps 2 and 4."""
    from dora_diffusion.config import TrainConfig
    from dora_diffusion.models import build_tiny_sdxl
    from dora_diffusion.train import train

    tmp = tmp_path_factory.mktemp("analysis")
    model = str(build_tiny_sdxl(tmp / "tiny"))
    data = tmp / "data"
    data.mkdir()
    for p in sorted(SAMPLE.glob("*.jpg"))[:2]:
        shutil.copy(p, data / p.name)
    runs = {}
    for method in ("lora", "dora"):
        runs[method] = tmp / f"run-{method}"
        train(
            TrainConfig(
                data=str(data),
                prompt="a photo of sks toy",
                output=str(runs[method]),
                model=model,
                resolution=64,
                max_steps=4,
                checkpoint_steps=2,
                validation_steps=0,
                num_validation_images=1,
                validation_inference_steps=2,
                report_to="none",
                learning_rate=1e-2,
                method=method,
            )
        )
    return model, runs


@pytest.mark.slow
def test_analyze_two_runs(tiny_runs, tmp_path):
    _, runs = tiny_runs
    summary = analyze([runs["lora"], runs["dora"]], tmp_path / "out")
    files = {k: Path(v) for k, v in summary["files"].items()}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files["png"].stat().st_size > 10_000
    with files["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"run", "method", "step", "component", "layer", "delta_m", "delta_d"}
    assert summary["steps"] == {"run-lora": [2, 4], "run-dora": [2, 4]}
    assert {(r["run"], r["method"]) for r in rows} == {("run-lora", "lora"), ("run-dora", "dora")}
    per_checkpoint = {}
    for r in rows:
        per_checkpoint.setdefault((r["run"], r["step"]), []).append(r)
        assert float(r["delta_m"]) > 0 and 0 < float(r["delta_d"]) < 2
    sizes = {len(v) for v in per_checkpoint.values()}
    assert len(per_checkpoint) == 4 and len(sizes) == 1 and sizes.pop() > 10  # every adapted layer, every checkpoint
    doc = json.loads(files["json"].read_text())
    assert len(doc["data"]) == len(rows) == summary["rows"]
    for group in ("by_method", "by_run", "by_checkpoint"):
        for fit in doc[group].values():
            assert -1.0 <= fit["pearson"] <= 1.0
    assert set(doc["by_method"]) == {"lora", "dora"}
    assert "run-dora (dora, " in summary["text"] and "r = " in summary["text"]


@pytest.mark.slow
def test_final_adapter_file_is_read_like_its_checkpoint(tiny_runs, tmp_path):
    """Without checkpoint-4 the final pytorch_lora_weights.safetensors stands for step 4: same numbers.
    A single checkpoint folder gives its step's numbers too."""
    model, runs = tiny_runs
    copy = tmp_path / "run-dora"
    shutil.copytree(runs["dora"], copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-4")
    result = analyze_runs(
        [runs["dora"], copy, runs["dora"] / "checkpoints" / "checkpoint-2"], model, layers=["to_q", "to_out.0"]
    )
    assert {r.layer.rsplit(".", 1)[-1] for r in result.rows} == {"to_q", "0"}
    by_run = {}
    for r in result.rows:
        by_run.setdefault(r.run, {})[(r.step, r.layer)] = (r.delta_m, r.delta_d)
    assert set(by_run) == {"run-dora", "run-dora (2)", "run-dora@checkpoint-2"}
    assert by_run["run-dora"].keys() == by_run["run-dora (2)"].keys()
    for key, value in by_run["run-dora"].items():
        assert by_run["run-dora (2)"][key] == pytest.approx(value, rel=1e-6)
    assert by_run["run-dora@checkpoint-2"] == {k: v for k, v in by_run["run-dora"].items() if k[0] == 2}


@pytest.mark.slow
def test_full_fine_tuning_folder(tiny_runs, tmp_path):
    """A fine-tuned UNet with one Linear rescaled per row and one turned: known answers, the rest 0."""
    from diffusers import UNet2DConditionModel

    model, _ = tiny_runs
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scaled, turned = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.attentions.0.proj_in"
    with torch.no_grad():
        w = unet.get_submodule(scaled).weight
        c = torch.linspace(0.9, 1.2, w.shape[0])
        expected_m = ((c - 1).abs() * w.norm(dim=1)).mean().item()
        w.mul_(c[:, None])
        w = unet.get_submodule(turned).weight
        w.copy_(_rotate_rows(w.double(), torch.full((w.shape[0],), 0.3, dtype=torch.float64)).float())
    unet.save_pretrained(tmp_path / "ft" / "checkpoint-10" / "unet")
    result = analyze_unet_folder(tmp_path / "ft", model)
    rows = {r.layer: r for r in result.rows}
    assert {(r.method, r.step, r.component) for r in result.rows} == {("full", 10, "unet")}
    assert rows[scaled].delta_m == pytest.approx(expected_m, rel=1e-5) and rows[scaled].delta_d < 1e-12
    assert rows[turned].delta_m < 1e-6 and rows[turned].delta_d == pytest.approx(1 - math.cos(0.3), rel=1e-5)
    untouched = [r for name, r in rows.items() if name not in (scaled, turned)]
    assert len(untouched) > 50 and all(r.delta_m == 0.0 and r.delta_d == 0.0 for r in untouched)


def test_what_is_not_a_run_is_named(tmp_path):
    with pytest.raises(AnalysisError, match="nope"):
        analyze_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="empty"):
        analyze_runs([tmp_path / "empty"])
    with pytest.raises(AnalysisError, match="no runs"):
        analyze_runs([])
