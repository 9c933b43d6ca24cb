"""Subject fidelity, prompt fidelity and drift: the DreamBooth paper's metrics and PEFT's drift.

- Subject fidelity (DreamBooth, Ruiz et al. 2023, §4.1): the mean pairwise cosine similarity between every
  generated image and every real subject image, in DINO space ("DINO") or CLIP image space ("CLIP-I").
- Prompt fidelity ("CLIP-T"): the mean cosine similarity between each image and its own prompt in CLIP space.
- Drift: how far the adapted model's image moved from the base model's for the same prompt and seed,
  ``1 - cos`` in an image embedding space; 0 when nothing changed.

Each metric is a plain function over ``[N, D]`` embeddings (or over images and prompts, given an embedder)
and returns a ``Score``: the mean and the spread of the per-image values, so a difference can be weighed
against the seed-to-seed spread (``ahead``). The embedders load local weights only: nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ClipEmbedder",
    "DinoEmbedder",
    "ImageEmbedder",
    "JudgeEmbedder",
    "MetricsModelNotFound",
    "Score",
    "TextEmbedder",
    "ahead",
    "drift",
    "prompt_fidelity",
    "subject_fidelity",
]


# --- scores ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """A metric's value over a set of images."""

    mean: float
    """The metric: the mean of the per-image values."""
    std: float
    """Sample standard deviation (n - 1) of the per-image values; 0 when ``n == 1``."""
    n: int
    """How many per-image values: generated images (subject fidelity) or pairs (the others)."""

    def __float__(self) -> float:
        return self.mean

    @classmethod
    def of(cls, values: torch.Tensor) -> Score:
        """The score of a 1-D tensor of per-image values."""
        n = values.numel()
        std = values.std(correction=1).item() if n > 1 else 0.0
        return cls(mean=values.mean().item(), std=std, n=n)


def ahead(a: Score, b: Score, names: tuple[str, str] = ("a", "b"), lower_is_better: bool = False) -> str:
    """One line saying which score is ahead and whether the gap exceeds the combined spread.

    The gap counts when ``|Δmean| > 2 * sqrt(std_a²/n_a + std_b²/n_b)`` (two standard errors of the
    difference); otherwise the line says it is within the spread. Higher is ahead unless ``lower_is_better``.
    """
    delta = a.mean - b.mean
    spread = 2.0 * math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
    values = f"{names[0]} {a.mean:.4f} ± {a.std:.4f} (n={a.n}) vs {names[1]} {b.mean:.4f} ± {b.std:.4f} (n={b.n})"
    if abs(delta) <= spread:
        return f"within the spread: {values}; |Δ| {abs(delta):.4f} ≤ 2 SE {spread:.4f}"
    leader = names[0] if (delta > 0) != lower_is_better else names[1]
    return f"{leader} ahead: {values}; |Δ| {abs(delta):.4f} > 2 SE {spread:.4f}"


# --- metrics ---------------------------------------------------------------------------------------


def _embeddings(name: str, x: Any) -> torch.Tensor:
    """``x`` as a float64 ``[N, D]`` tensor, unit rows (a zero row stays zero: cosine 0 with anything)."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] tensor of embeddings, got shape {tuple(x.shape)}")
    return F.normalize(x, dim=1)


def _embed(x: Any, embed: Callable[[Any], torch.Tensor] | None) -> Any:
    return embed(list(x)) if embed is not None else x


def _pair(names: tuple[str, str], a: Any, b: Any, row_matched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _embeddings(names[0], a), _embeddings(names[1], b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} has {a.shape[1]} dimensions, {names[1]} {b.shape[1]}: not one embedding space")
    if row_matched and a.shape[0] != b.shape[0]:
        raise ValueError(f"{names[0]} has {a.shape[0]} rows, {names[1]} {b.shape[0]}: row i pairs with row i")
    return a, b


def subject_fidelity(generated: Any, reference: Any, embedder: ImageEmbedder | None = None) -> Score:
    """DINO / CLIP-I: the mean cosine similarity over every (generated, reference) pair.

    ``generated`` ``[N, D]`` and ``reference`` ``[M, D]`` are embeddings, or lists of images when an
    ``embedder`` is given (DINO when it is a ``DinoEmbedder``, CLIP-I when a ``ClipEmbedder``). The mean is
    symmetric: swapping the two arguments gives the same mean. The spread is not: ``std`` and ``n`` run over
    the generated images, each one's value being its mean similarity to all the references.
    """
    embed = embedder.embed_images if embedder is not None else None
    g, r = _pair(("generated", "reference"), _embed(generated, embed), _embed(reference, embed), row_matched=False)
    return Score.of((g @ r.T).mean(dim=1))  # [N, M] -> [N]


def prompt_fidelity(images: Any, texts: Any, embedder: TextEmbedder | None = None) -> Score:
    """CLIP-T: the mean cosine similarity of image i with text i.

    ``images`` and ``texts`` are ``[N, D]`` embeddings in one space, or a list of images and a list of
    prompts when an ``embedder`` with ``embed_texts`` (a ``ClipEmbedder``) is given.
    """
    img = _embed(images, embedder.embed_images if embedder is not None else None)
    txt = _embed(texts, embedder.embed_texts if embedder is not None else None)
    i, t = _pair(("images", "texts"), img, txt, row_matched=True)
    return Score.of((i * t).sum(dim=1))


def drift(base: Any, adapted: Any, embedder: ImageEmbedder | None = None) -> Score:
    """Mean ``1 - cos`` between the base model's image i and the adapted model's image i.

    Row i of both is the same prompt and seed. ``[N, D]`` embeddings, or lists of images when an
    ``embedder`` is given. 0 for identical images; it grows as the adapter moves the model away from the base.
    """
    embed = embedder.embed_images if embedder is not None else None
    b, a = _pair(("base", "adapted"), _embed(base, embed), _embed(adapted, embed), row_matched=True)
    return Score.of(1.0 - (b * a).sum(dim=1))


# --- embedders -------------------------------------------------------------------------------------


@runtime_checkable
class ImageEmbedder(Protocol):
    """Anything that turns images into embeddings."""

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``[N, D]`` embeddings of ``N`` images."""
        ...


@runtime_checkable
class TextEmbedder(ImageEmbedder, Protocol):
    """An image embedder whose space also holds text (CLIP)."""

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """``[N, D]`` embeddings of ``N`` texts, in the images' space."""
        ...


class MetricsModelNotFound(FileNotFoundError):
    """The embedding model is neither a readable local folder nor in the local Hugging Face cache."""


def _from_pretrained(load: Callable[..., Any], model: str | os.PathLike[str], what: str) -> Any:
    """``load(model, local_files_only=True)``, with a transformers ``OSError`` turned into a clear error."""
    name = os.fspath(model)
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return load(str(folder), local_files_only=True)
        except OSError as error:
            raise MetricsModelNotFound(f"Folder {folder} does not hold a readable {what} ({error})") from error
    if isinstance(model, os.PathLike) or name.startswith((".", "~", "/", "\\")) or name.count("/") > 1:
        raise MetricsModelNotFound(f"Model folder {folder} does not exist.")
    try:
        return load(name, local_files_only=True)
    except OSError as error:
        raise MetricsModelNotFound(
            f"Model {name!r} ({what}) is neither a local folder nor in the local Hugging Face cache; nothing was "
            f"downloaded. On a connected machine run `hf download {name}` (older huggingface_hub: "
            f"`huggingface-cli download {name}`), or pass the folder it was saved to."
        ) from error


class _Backbone:
    """Shared parts of the transformers embedders: device, batching, RGB images, no gradients."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device, batch: int) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch = batch

    def _batched(self, items: Sequence[Any], embed: Callable[[Sequence[Any]], torch.Tensor]) -> torch.Tensor:
        if len(items) == 0:
            raise ValueError("nothing to embed: the list is empty")
        with torch.no_grad():
            parts = [embed(items[i : i + self.batch]).float().cpu() for i in range(0, len(items), self.batch)]
        return torch.cat(parts)

    def _pixels(self, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [image.convert("RGB") for image in images]
        return processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected features; transformers 5 an output whose pooler holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoEmbedder(_Backbone):
    """DINO embeddings (the CLS token of the last hidden state): DINOv2, or a DINO v1 ViT
    (``facebook/dino-vits16``, the DreamBooth paper's), through ``AutoModel``. Local files only."""

    def __init__(
        self,
        model: str | os.PathLike[str] = "facebook/dinov2-small",
        device: str | torch.device = "cpu",
        batch: int = 16,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.processor = _from_pretrained(AutoImageProcessor.from_pretrained, model, "image processor")
        super().__init__(_from_pretrained(AutoModel.from_pretrained, model, "DINO model"), device, batch)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``[N, hidden]`` CLS embeddings."""

        def embed(part: Sequence[Image.Image]) -> torch.Tensor:
            return self.model(pixel_values=self._pixels(self.processor, part)).last_hidden_state[:, 0]

        return self._batched(images, embed)


class ClipEmbedder(_Backbone):
    """CLIP's projected image and text features (CLIP-I, CLIP-T). Local files only."""

    def __init__(
        self,
        model: str | os.PathLike[str] = "openai/clip-vit-large-patch14",
        device: str | torch.device = "cpu",
        batch: int = 16,
    ) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.processor = _from_pretrained(CLIPImageProcessor.from_pretrained, model, "CLIP image processor")
        self.tokenizer = _from_pretrained(CLIPTokenizer.from_pretrained, model, "CLIP tokenizer")
        super().__init__(_from_pretrained(CLIPModel.from_pretrained, model, "CLIP model"), device, batch)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``[N, projection_dim]`` image features."""

        def embed(part: Sequence[Image.Image]) -> torch.Tensor:
            return _features(self.model.get_image_features(pixel_values=self._pixels(self.processor, part)))

        return self._batched(images, embed)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """``[N, projection_dim]`` text features; prompts longer than CLIP's context are truncated."""

        def embed(part: Sequence[str]) -> torch.Tensor:
            tokens = self.tokenizer(list(part), padding=True, truncation=True, return_tensors="pt").to(self.device)
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            return _features(self.model.get_text_features(input_ids=ids, attention_mask=mask))

        return self._batched(texts, embed)


class JudgeEmbedder:
    """Any object with ``embed_images(list[PIL.Image]) -> [N, D]``, as an ``ImageEmbedder``: the toy world's
    judge (``dora_diffusion.world.judge.Judge``) stands in for DINO on the embedded tiny model."""

    def __init__(self, judge: Any) -> None:
        if not callable(getattr(judge, "embed_images", None)):
            raise TypeError(f"{type(judge).__name__} has no embed_images(images) method")
        self.judge = judge

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """The judge's ``[N, D]`` features, as a float CPU tensor."""
        with torch.no_grad():
            return torch.as_tensor(self.judge.embed_images(list(images))).float().cpu()
