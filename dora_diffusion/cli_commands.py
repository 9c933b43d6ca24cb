"""The subcommands' handlers (all but ``train``, which ``cli`` keeps: only the shells import the loop): each
reads its parsed arguments, sets torch's threads for the model it loads and calls one library function."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def set_threads(args: argparse.Namespace, model: str | None) -> int:
    """torch's CPU threads for a command on ``model`` (``--threads``, else the default for that model)."""
    from .threads import set_torch_threads

    return set_torch_threads(args.threads, model=model)


def recorded_model(given: str | None, sources: list[str]) -> str | None:
    """The base model a command loads: the one given, else the first one its runs recorded."""
    if given:
        return given
    from .runs import base_model

    for source in sources:
        with contextlib.suppress(Exception):  # a bad path is reported by the command itself
            if (model := base_model(source)) is not None:
                return model
    return None


def _tiny_model(args: argparse.Namespace) -> int:
    from .models import build_tiny_sdxl

    set_threads(args, None)
    path = build_tiny_sdxl(args.path, seed=args.seed)
    print(
        f"tiny SDXL pipeline written to {path}\nload it with StableDiffusionXLPipeline.from_pretrained({str(path)!r})"
    )
    return 0


def _pretrain_tiny(args: argparse.Namespace) -> int:
    from .world.pretrain import PretrainConfig, pretrain_tiny

    overrides = {k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__ and v is not None}
    folder = pretrain_tiny(PretrainConfig(**overrides))
    if folder is None:
        print(f"pretrain-tiny: this chunk ended; run the same command again to continue ({args.work})")
    else:
        from .world.card import write_model_card

        card = write_model_card(args.work, folder)
        print(f"pretrained tiny SDXL written to {folder} (model card: {card})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), steps=args.steps, overwrite=args.overwrite, threads=args.threads)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from . import demo
    from .config import ConfigError
    from .sweep import SweepConfig, run_sweep

    def ints(text: str, name: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected comma-separated integers, got {text!r}") from None

    sample = args.data is None  # the demo's subject, prompts and scene prompts
    scenes = dict(demo.SCENE_PROMPTS) if sample else {p: "" for p in (args.scene_prompts or "").split("|") if p.strip()}
    cfg = SweepConfig(
        output=args.output,
        data=str(demo.SAMPLE_DATA) if sample else args.data,
        prompt=args.prompt or demo.PROMPT,
        class_prompt=args.class_prompt or demo.CLASS_PROMPT,
        model=args.model,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        ranks=ints(args.ranks, "ranks"),
        seeds=ints(args.seeds, "seeds"),
        steps=args.steps,
        learning_rate=args.learning_rate,
        snr_gamma=args.snr_gamma or None,
        targets=args.targets,
        scene_prompts=scenes,
        eval_seeds=args.eval_seeds,
        dino=args.dino,
        clip=args.clip,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    summary = run_sweep(cfg)
    print((Path(args.output) / "sweep.md").read_text())
    print(f"{len(summary['cells'])} cells; table, CSV, JSON and plot in {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_adapter

    set_threads(args, recorded_model(args.model, [args.adapter]))
    path = export_adapter(
        args.adapter, args.format, args.out, model=args.model, dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"{args.format} export written to {path}")
    if args.format == "comfyui":
        from .formats.comfyui import NOTE

        print(f"this file is {NOTE}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .export import verify_adapter

    set_threads(args, recorded_model(args.model, [args.adapter]))
    report = verify_adapter(args.adapter, args.model, loader=args.loader, tolerance=args.tolerance)
    print(report)
    return 0 if report.ok else 1


def _app(args: argparse.Namespace) -> int:
    import importlib.util

    from .config import ConfigError
    from .engine import Engine

    main_py = Path(__file__).resolve().parents[1] / "app" / "main.py"
    if not main_py.is_file():
        raise ConfigError(f"app: {main_py} ships with the repository; run the app from a checkout")
    spec = importlib.util.spec_from_file_location("dora_diffusion_app", main_py)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    app.serve(
        Engine(model=args.model, workspace=args.outputs),
        host=args.host,
        port=args.port,
        share=args.share,
        threads=args.threads,
    )
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    set_threads(args, recorded_model(args.model, args.runs))
    summary = analyze(args.runs, args.out, model=args.model, layers=args.layers.split(",") if args.layers else None)
    print(summary["text"])
    for kind, path in summary["files"].items():
        print(f"{kind}: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare
    from .config import ConfigError
    from .config_args import config_from_args

    train_cfg = config_from_args(args)
    set_threads(args, train_cfg.model)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        raise ConfigError(f"ranks: expected comma-separated integers, got {args.ranks!r}") from None
    prompts = [p.strip() for p in args.validation_prompts.split("|")] if args.validation_prompts else []
    compare(
        CompareConfig(
            train_cfg,
            methods=[m.strip() for m in args.methods.split(",")],
            ranks=ranks,
            validation_prompts=prompts,
            sample_steps=args.sample_steps,
            sample_size=args.sample_size,
            eval_seeds=args.eval_seeds,
            dino=args.dino,
            clip=args.clip,
        )
    )
    return 0


# handler of each subcommand, by the name ``cli_parser.build_parser`` asks for
COMMANDS = {
    "tiny_model": _tiny_model,
    "pretrain_tiny": _pretrain_tiny,
    "demo": _demo,
    "sweep": _sweep,
    "export": _export,
    "verify": _verify,
    "app": _app,
    "analyze": _analyze,
    "compare": _compare,
}
