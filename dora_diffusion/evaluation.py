"""Scoring a model state (the base, or the base with one adapter loaded) on fixed prompts and seeds.

Shared by ``sweep``, ``compare`` and the demo: one pipeline, adapters swapped in and out, every model
sampled from the same initial noise, so the scores differ only by the adapter. The metrics themselves are
the plain functions of ``metrics``; this module generates the images they are computed on.

- subject fidelity: the instance prompt's images against the subject's photos (DINO, or on the embedded
  tiny model the toy world's judge embedding);
- subject drawn (embedded model only): how often the judge reads the subject (teal robot with a heart);
- prompt fidelity: CLIP-T of the scene prompts' images when a CLIP model is given, else on the embedded
  model the judge's rate of keeping the scene each prompt asks for;
- drift: the class prompt's images against the base model's (``1 - cos``, same seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import ConfigError

DEFAULT_EVAL_SEED = 1000  # sampling seeds are DEFAULT_EVAL_SEED, +1, ... (apart from training seeds)


METRICS = ("subject_fidelity", "subject_drawn", "prompt_fidelity", "drift")
"""The scores an ``Evaluator`` gives, in table order."""
LOWER_IS_BETTER = frozenset({"drift"})


def verdict_lines(a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str]) -> list[tuple[str, str]]:
    """``(metric, line)`` for every metric both score dicts hold: which is ahead and whether the gap exceeds
    two standard errors (``metrics.ahead``). ``a`` and ``b`` map a metric to ``{"mean", "std", "n"}``."""
    from .metrics import Score, ahead

    return [
        (f, ahead(Score(**a[f]), Score(**b[f]), names=names, lower_is_better=f in LOWER_IS_BETTER))
        for f in METRICS
        if f in a and f in b
    ]


def judge_of(model_dir: str | Path):
    """The toy world's judge shipped beside a model (``<model>/judge``), or None."""
    from .world.judge import CONFIG_NAME, Judge

    folder = Path(model_dir) / "judge"
    return Judge.load(folder) if (folder / CONFIG_NAME).is_file() else None


def check_embedders(model_dir: str | Path, dino: str | None, clip: str | None, prompt_fidelity: bool) -> None:
    """Refuse early (before any training) when nothing can embed the images."""
    has_judge = (Path(model_dir) / "judge").is_dir()
    if not dino and not has_judge:
        raise ConfigError(f"dino: {model_dir} has no toy-world judge; pass a DINO model (--dino facebook/dinov2-small)")
    if prompt_fidelity and not clip and not has_judge:
        raise ConfigError("clip: prompt fidelity needs a CLIP model (--clip) or the embedded model's judge")


def scene_prompts_for_judge(prompts: Sequence[str]) -> dict[str, str]:
    """The prompts that name a scene of the toy world, with that scene ("sks toy on the grass": "grass")."""
    from .world.toys import SCENES

    return {p: scene for p in prompts for scene, words in SCENES.items() if words in p}


def square(image):
    """The centre square of an image, RGB."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.convert("RGB").crop((left, top, left + side, top + side))


def _pool(scores: Sequence[Any]) -> dict[str, Any]:
    """Scores of groups pooled into one: the mean over all values, the pooled sample std."""
    n = sum(s.n for s in scores)
    mean = sum(s.mean * s.n for s in scores) / n
    ss = sum((s.n - 1) * s.std**2 + s.n * (s.mean - mean) ** 2 for s in scores)
    return {"mean": mean, "std": (ss / (n - 1)) ** 0.5 if n > 1 else 0.0, "n": n}


class Evaluator:
    """Generates the evaluation images of one model state and scores them."""

    def __init__(
        self,
        model_dir: str | Path,
        data: str | Path,
        prompt: str,
        class_prompt: str | None,
        scene_prompts: Mapping[str, str] | None = None,
        eval_seeds: int = 16,
        inference_steps: int = 25,
        guidance: float = 5.0,
        dino: str | None = None,
        clip: str | None = None,
        pipe=None,
    ):
        from .images import load_rgb
        from .metrics import ClipEmbedder, DinoEmbedder, JudgeEmbedder
        from .models import load_pipeline
        from .subject_folder import scan_subject_folder

        check_embedders(model_dir, dino, clip, bool(scene_prompts))
        self.prompt, self.class_prompt = prompt, class_prompt
        self.scene_prompts = dict(scene_prompts or {})
        self.inference_steps, self.guidance = inference_steps, guidance
        self.pipe = pipe if pipe is not None else load_pipeline(str(model_dir))
        self.pipe.set_progress_bar_config(disable=True)
        self.judge = judge_of(model_dir)
        self.embedder = DinoEmbedder(dino) if dino else JudgeEmbedder(self.judge)
        self.embedding = "DINO" if dino else "judge"
        self.clip = ClipEmbedder(clip) if clip else None
        photos = [square(load_rgb(r.path)) for r in scan_subject_folder(data, 64, min_side_ratio=0).used]
        self.reference = self.embedder.embed_images(photos)
        self.seeds = list(range(DEFAULT_EVAL_SEED, DEFAULT_EVAL_SEED + eval_seeds))
        self.base_class = None

    def images(self, prompt: str) -> list:
        from .world.evaluate import generate_batch

        return generate_batch(
            self.pipe, [prompt] * len(self.seeds), self.seeds, steps=self.inference_steps, guidance=self.guidance
        )

    def evaluate(self, adapter: str | Path | None) -> dict[str, Any]:
        """Scores of the base model (``adapter`` None; evaluate it first: drift is measured from it) or of
        the pipeline with ``adapter`` loaded. Each score: mean, std and n (images or image pairs)."""
        import torch

        from .formats import load_adapter, unload_adapter
        from .metrics import Score, drift, prompt_fidelity, subject_fidelity

        unload_adapter(self.pipe)
        if adapter is not None:
            load_adapter(self.pipe, adapter)
        try:
            out: dict[str, Any] = {"eval_seeds": len(self.seeds), "embedding": self.embedding}
            instance = self.images(self.prompt)
            out["subject_fidelity"] = asdict(subject_fidelity(self.embedder.embed_images(instance), self.reference))
            if self.judge is not None:
                drawn = torch.tensor([float(r["subject"]) for r in self.judge.read(instance)])
                out["subject_drawn"] = asdict(Score.of(drawn))
            if self.scene_prompts and self.clip is not None:
                scores = []
                for prompt in self.scene_prompts:
                    images = self.images(prompt)
                    scores.append(
                        prompt_fidelity(self.clip.embed_images(images), self.clip.embed_texts([prompt] * len(images)))
                    )
                out["prompt_fidelity"], out["prompt_fidelity_kind"] = _pool(scores), "CLIP-T"
            elif self.scene_prompts:
                kept = []
                for prompt, scene in self.scene_prompts.items():
                    kept += [float(r["scene"] == scene) for r in self.judge.read(self.images(prompt))]
                out["prompt_fidelity"] = asdict(Score.of(torch.tensor(kept)))
                out["prompt_fidelity_kind"] = "scene kept (judge)"
            if self.class_prompt:
                class_emb = self.embedder.embed_images(self.images(self.class_prompt))
                if adapter is None:
                    self.base_class = class_emb
                elif self.base_class is not None:
                    out["drift"] = asdict(drift(self.base_class, class_emb))
            return out
        finally:
            unload_adapter(self.pipe)
