"""Metrics: hand-computed values on 2-D embeddings; tiny random-weight DINO, ViT and CLIP from configs."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dora_diffusion import _tiny_vocab
from dora_diffusion.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    ImageEmbedder,
    JudgeEmbedder,
    MetricsModelNotFound,
    Score,
    TextEmbedder,
    ahead,
    drift,
    prompt_fidelity,
    subject_fidelity,
)

R2 = math.sqrt(2.0)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def images(n=3, size=(40, 48)):
    """Distinct, deterministic RGB images (not 32 px and not square: the processors resize and crop)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels, "RGB"))
    return out


# --- metrics by hand ------------------------------------------------------------------------------


def test_subject_fidelity_by_hand():
    # cos: g0.r0 = 1, g0.r1 = 1/√2, g1.r0 = 0, g1.r1 = 1/√2 (lengths differ: only directions count)
    score = subject_fidelity(t([[3, 0], [0, 0.5]]), t([[1, 0], [2, 2]]))
    per_image = [(1 + 1 / R2) / 2, (0 + 1 / R2) / 2]
    assert score.mean == pytest.approx((1 + R2) / 4)
    assert score.std == pytest.approx(abs(per_image[0] - per_image[1]) / R2)  # sample std of two values
    assert score.n == 2


def test_subject_fidelity_mean_is_symmetric_spread_is_per_generated_image():
    g = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    r = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    forward, backward = subject_fidelity(g, r), subject_fidelity(r, g)
    assert forward.mean == pytest.approx(backward.mean)
    assert (forward.n, backward.n) == (5, 3)
    assert forward.std != pytest.approx(backward.std)


def test_prompt_fidelity_by_hand():
    # row 0: cos([1, 0], [1, 1]) = 1/√2; row 1: cos([0, 2], [0, -1]) = -1; rows do not mix
    score = prompt_fidelity(t([[1, 0], [0, 2]]), t([[1, 1], [0, -1]]))
    assert score.mean == pytest.approx((1 / R2 - 1) / 2)
    assert score.std == pytest.approx((1 / R2 + 1) / R2)
    assert score.n == 2


def test_drift_by_hand():
    # 1 - cos per pair: same direction 0, orthogonal 1, opposite 2
    score = drift(t([[1, 0], [0, 1], [1, 1]]), t([[2, 0], [1, 0], [-1, -1]]))
    assert (score.mean, score.n) == (pytest.approx(1.0), 3)
    assert score.std == pytest.approx(1.0)


def test_drift_zero_for_identical_positive_otherwise():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    same = drift(x, x.clone())
    assert same.mean == pytest.approx(0.0, abs=1e-12) and same.std == pytest.approx(0.0, abs=1e-12)
    moved = x.clone()
    moved[2] += torch.randn(6, generator=torch.Generator().manual_seed(4))
    assert drift(x, moved).mean > 1e-3
    assert drift(x, 5.0 * x).mean == pytest.approx(0.0, abs=1e-12)  # a scale is no drift


def test_one_value_has_no_spread():
    assert subject_fidelity(t([[1, 0]]), t([[1, 1], [1, -1]])) == Score(mean=pytest.approx(1 / R2), std=0.0, n=1)
    assert float(Score(0.5, 0.1, 4)) == 0.5


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: prompt_fidelity(t([[1, 0], [0, 1]]), t([[1, 0]])), "row i pairs with row i"),
        (lambda: drift(t([[1, 0]]), t([[1, 0, 0]])), "not one embedding space"),
        (lambda: subject_fidelity(torch.zeros(0, 2), t([[1, 0]])), "generated"),
        (lambda: subject_fidelity(torch.ones(2), t([[1, 0]])), "[N, D]"),
    ],
)
def test_bad_shapes_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


# --- ahead ----------------------------------------------------------------------------------------


def test_ahead_within_the_spread():
    # combined spread: 2 * sqrt(0.1²/100 + 0.1²/100) = 0.0283 > |Δ| = 0.01
    line = ahead(Score(0.80, 0.1, 100), Score(0.79, 0.1, 100), names=("DoRA", "LoRA"))
    assert line.startswith("within the spread") and "DoRA" in line and "LoRA" in line
    # |Δ| = 0.025 lies between one standard error (0.0141) and two (0.0283): still within
    assert ahead(Score(0.800, 0.1, 100), Score(0.775, 0.1, 100)).startswith("within the spread")


@pytest.mark.parametrize("lower_is_better, leader", [(False, "LoRA"), (True, "DoRA")])
def test_ahead_names_the_leader(lower_is_better, leader):
    line = ahead(Score(0.70, 0.1, 100), Score(0.80, 0.1, 100), ("DoRA", "LoRA"), lower_is_better=lower_is_better)
    assert line.startswith(f"{leader} ahead") and "within" not in line


def test_ahead_needs_the_gap_to_beat_the_spread_of_few_samples():
    # the same Δ = 0.1 is within the spread with 4 images per side, ahead with 400
    assert ahead(Score(0.9, 0.2, 4), Score(0.8, 0.2, 4)).startswith("within the spread")
    assert ahead(Score(0.9, 0.2, 400), Score(0.8, 0.2, 400)).startswith("a ahead")
    assert ahead(Score(0.5, 0.0, 1), Score(0.5, 0.0, 1)).startswith("within the spread")


# --- tiny real backbones --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("dino-v1-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    files = _tiny_vocab.write_tokenizer_files(tmp_path_factory.mktemp("vocab"))
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
    vocab, _ = _tiny_vocab.vocab_and_merges()
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    text = dict(
        tiny,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab[_tiny_vocab.BOS],
        eos_token_id=vocab[_tiny_vocab.EOS],
        pad_token_id=vocab[_tiny_vocab.EOS],
    )
    torch.manual_seed(0)
    vision = dict(tiny, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino(dino_dir):
    return DinoEmbedder(dino_dir)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipEmbedder(str(clip_dir))


def test_dino_reads_a_local_folder_deterministically(dino, dino_dir):
    pics = images(3)
    x = dino.embed_images(pics)
    assert x.shape == (3, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, dino.embed_images(pics))
    assert torch.allclose(x, DinoEmbedder(str(dino_dir), batch=2).embed_images(pics), atol=1e-5)  # reload, batches
    assert not torch.allclose(x[0], x[1])  # different images, different embeddings
    assert isinstance(dino, ImageEmbedder)


def test_dino_embedding_is_the_cls_token(dino):
    pics = images(2)
    with torch.no_grad():
        pixels = dino.processor(images=pics, return_tensors="pt")["pixel_values"]
        assert pixels.shape[-2:] == (32, 32)
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]  # [N, hidden]
    assert torch.allclose(dino.embed_images(pics), cls, atol=1e-6)


def test_an_image_is_its_own_nearest(dino):
    pics = images(2)
    assert subject_fidelity(pics[:1], pics[:1], embedder=dino).mean == pytest.approx(1.0, abs=1e-5)
    assert drift(pics, list(pics), embedder=dino).mean == pytest.approx(0.0, abs=1e-5)
    assert drift(pics, pics[::-1], embedder=dino).mean > 1e-4


def test_dino_v1_vit_through_automodel(vit_dir):
    embedder = DinoEmbedder(vit_dir)
    assert type(embedder.model).__name__ == "ViTModel"
    x = embedder.embed_images(images(2))
    assert x.shape == (2, 32) and torch.equal(x, embedder.embed_images(images(2)))


def test_clip_images_and_texts(clip):
    pics = images(2)
    img = clip.embed_images(pics)
    assert img.shape == (2, 16) and torch.equal(img, clip.embed_images(pics))
    prompts = ["a photo of sks dog on the beach", "toy"]
    txt = clip.embed_texts(prompts)
    assert txt.shape == (2, 16) and torch.equal(txt, clip.embed_texts(prompts))
    # padding the short prompt to the long one's length does not change its features
    assert torch.allclose(txt[1], clip.embed_texts(["toy"])[0], atol=1e-5)
    assert isinstance(clip, TextEmbedder)


def test_clip_scores_through_the_embedder(clip):
    pics, prompts = images(2), ["a red duck", "a blue ball"]
    score = prompt_fidelity(pics, prompts, embedder=clip)
    expected = prompt_fidelity(clip.embed_images(pics), clip.embed_texts(prompts))
    assert score.n == 2 and -1.0 <= score.mean <= 1.0 and score.mean == pytest.approx(expected.mean)
    assert subject_fidelity(pics[:1], pics[:1], embedder=clip).mean == pytest.approx(1.0, abs=1e-5)  # CLIP-I


# --- models that are not on disk ------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "make, name", [(DinoEmbedder, "facebook/dinov2-small"), (ClipEmbedder, "openai/clip-vit-large-patch14")]
)
def test_a_missing_model_id_says_so(empty_hf_cache, make, name):
    with pytest.raises(MetricsModelNotFound) as caught:
        make(name)
    message = str(caught.value)
    assert name in message and "nothing was downloaded" in message and f"hf download {name}" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_the_default_models_are_the_papers(empty_hf_cache):
    with pytest.raises(MetricsModelNotFound, match="facebook/dinov2-small"):
        DinoEmbedder()
    with pytest.raises(MetricsModelNotFound, match="openai/clip-vit-large-patch14"):
        ClipEmbedder()


def test_a_missing_or_empty_folder_says_so(tmp_path):
    with pytest.raises(MetricsModelNotFound, match="does not exist"):
        DinoEmbedder(tmp_path / "nowhere")
    with pytest.raises(MetricsModelNotFound, match=str(tmp_path)):
        ClipEmbedder(tmp_path)


# --- the judge ------------------------------------------------------------------------------------


class StandInJudge:
    """Like ``dora_diffusion.world.judge.Judge``: ``embed_images(list[PIL]) -> [N, D]`` (here: mean colour)."""

    def __init__(self):
        self.seen = []

    def embed_images(self, pics):
        self.seen.append(pics)
        return torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float64)).mean(dim=(0, 1)) for p in pics])


def test_judge_embedder_passes_images_through():
    judge = StandInJudge()
    embedder = JudgeEmbedder(judge)
    pics = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    x = embedder.embed_images(pics)
    assert len(judge.seen) == 1 and all(a is b for a, b in zip(judge.seen[0], pics, strict=True))
    assert x.dtype == torch.float32 and torch.equal(x, t([[255, 0, 0], [0, 0, 255]]))
    assert isinstance(embedder, ImageEmbedder)
    assert subject_fidelity(pics[:1], pics, embedder=embedder).mean == pytest.approx(0.5)  # cos 1 and 0
    assert drift(pics, pics[::-1], embedder=embedder).mean == pytest.approx(1.0)  # orthogonal colours


def test_judge_embedder_refuses_what_cannot_embed():
    with pytest.raises(TypeError, match="embed_images"):
        JudgeEmbedder(object())


def test_importing_metrics_loads_neither_transformers_nor_the_world():
    heavy = "('transformers', 'dora_diffusion.world')"
    code = f"import sys, dora_diffusion.metrics; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
