"""``dora-diffusion``: a thin shell over the library; every subcommand calls one function."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

EPILOG = """examples:
  dora-diffusion tiny-model outputs/tiny-sdxl                     # the random-weight tiny SDXL (tests)
  dora-diffusion pretrain-tiny --work outputs/pretrain --max-minutes 60   # the shipped model's recipe
  dora-diffusion train --data datasets/sks_toy --prompt "a photo of sks toy" --method dora --output outputs/toy-dora
  dora-diffusion train --config run.toml --max-steps 800          # options override the file
  dora-diffusion train --output outputs/toy-dora --resume latest  # continue a run
  dora-diffusion demo                                             # LoRA vs DoRA on the sample subject
  dora-diffusion app                                              # the Gradio app on 127.0.0.1:7860
  dora-diffusion export --adapter outputs/toy-dora --format kohya --out toy_dora.safetensors
  dora-diffusion verify --adapter toy_dora.safetensors
  dora-diffusion analyze outputs/demo/lora outputs/demo/dora      # ΔD vs ΔM, as in the DoRA paper's Figure 2
"""


def _threads(args: argparse.Namespace, model: str | None) -> int:
    from .threads import set_torch_threads

    return set_torch_threads(args.threads, model=model)


def _recorded_model(given: str | None, sources: list[str]) -> str | None:
    """The base model a command loads: the one given, else the first one its runs recorded."""
    if given:
        return given
    from .runs import base_model

    for source in sources:
        with contextlib.suppress(Exception):  # a bad path is reported by the command itself
            if (model := base_model(source)) is not None:
                return model
    return None


def _train(args: argparse.Namespace) -> int:
    from .config import config_from_args
    from .train import train

    config = config_from_args(args)
    _threads(args, config.model)
    result = train(config)
    learned = (
        f"adapter: {result.adapter_file}"
        if result.adapter_file
        else "tuned: " + ", ".join(str(p) for p in result.tuned_components)
    )
    print(
        f"\n{learned}\nfinal loss {result.final_loss:.4f}, "
        f"median step {result.median_step_seconds * 1000:.0f} ms, {result.trainable_parameters:,} trainable parameters"
    )
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from .models import build_tiny_sdxl

    _threads(args, None)
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

    _threads(args, _recorded_model(args.model, [args.adapter]))
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

    _threads(args, _recorded_model(args.model, [args.adapter]))
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

    _threads(args, _recorded_model(args.model, args.runs))
    summary = analyze(args.runs, args.out, model=args.model, layers=args.layers.split(",") if args.layers else None)
    print(summary["text"])
    for kind, path in summary["files"].items():
        print(f"{kind}: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare
    from .config import ConfigError, config_from_args

    train_cfg = config_from_args(args)
    _threads(args, train_cfg.model)
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1 on the embedded tiny "
        "model, min(4, CPUs) on a real one)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="dora-diffusion",
        description="Personalise Stable Diffusion XL with DoRA, LoRA beside it as the baseline.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train an adapter on a folder of subject images",
        description="DreamBooth-train a LoRA, DoRA or magnitude-only adapter on SDXL. "
        "Every option can also be set in a TOML/YAML/JSON file given with --config; "
        "options on the command line win.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file of options (keys as below, '-' or '_')")
    add_config_arguments(p)
    _add_threads(p)
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "tiny-model", help="build the tiny SDXL-architecture pipeline with random weights (for fast tests)"
    )
    p.add_argument("path", help="folder to write (must not exist, or be empty, or hold an older tiny model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    _add_threads(p)
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser(
        "pretrain-tiny",
        help="pretrain the embedded tiny SDXL on the toy world (the shipped weights' recipe)",
        description="Render the toy world, train the VAE, the judge, then the UNet with both text "
        "encoders; write the pipeline, the judge and a model card. Seeded and resumable: run the "
        "same command again to continue from the last checkpoint.",
    )
    p.add_argument(
        "--work", default="outputs/pretrain", help="working folder: renders, checkpoints, logs (default: %(default)s)"
    )
    p.add_argument("--output", default=None, help="finished model folder (default: WORK/model)")
    p.add_argument(
        "--max-minutes",
        dest="max_minutes",
        type=float,
        default=None,
        help="end this chunk at the first checkpoint after so many minutes (resume: run again)",
    )
    p.add_argument(
        "--stop-after",
        dest="stop_after",
        default=None,
        choices=("data", "vae", "judge", "unet"),
        help="stop when this stage is done",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=None, help="seed of everything (default: 0)")
    for name in ("images", "vae_steps", "judge_steps", "unet_steps", "unet_batch"):
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            default=None,
            help="recipe override (a different recipe needs a new --work folder)",
        )
    p.set_defaults(func=_pretrain_tiny)

    p = sub.add_parser(
        "export",
        help="export an adapter: diffusers, kohya (LyCORIS), comfyui (ComfyUI/Forge), or merged into the model",
        description="Export a run's adapter (or any adapter file we can read). Formats: "
        "diffusers (pytorch_lora_weights.safetensors for pipe.load_lora_weights), "
        "kohya (lora_unet_/lora_te1_/lora_te2_ keys, SGM names, dora_scale [out, 1]: LyCORIS, sd-scripts), "
        "comfyui (the kohya keys, dora_scale rescaled for ComfyUI's and Forge's DoRA formula, from the base model), "
        "merged-folder (a diffusers pipeline folder with the adapter baked in), "
        "merged-single (one .safetensors in the original SDXL layout: from_single_file, ComfyUI, A1111). "
        "A full fine-tuning run (--method full) has no adapter: merged-folder and merged-single only.",
    )
    p.add_argument(
        "--adapter", required=True, help="run folder, one of its checkpoint folders, or adapter .safetensors file"
    )
    p.add_argument(
        "--format", required=True, choices=("diffusers", "kohya", "comfyui", "merged-folder", "merged-single")
    )
    p.add_argument("--out", required=True, help="output folder or .safetensors file")
    p.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="dtype of merged exports"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_threads(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="check that an exported adapter reproduces its recorded outputs on a base model")
    p.add_argument("--adapter", required=True, help="adapter .safetensors file (or its folder) written by `export`")
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the file)")
    p.add_argument(
        "--loader",
        default="ours",
        choices=("ours", "diffusers"),
        help="load with our loader or diffusers' load_lora_weights",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error per component (default: 1e-4)")
    _add_threads(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "compare",
        help="train several methods/ranks with identical settings; grid, analysis, table",
        description="Fair comparison: every (method, rank) trains with the same data order, seeds, steps "
        "and settings (all `train` options apply to every run). Writes grid.png (rows: validation prompts, "
        "columns: method x rank), analysis/decomposition.png and summary.md/json under --output.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file of train options")
    p.add_argument(
        "--methods", default="lora,dora", help="comma-separated: lora, dora, magnitude, dvora (default: lora,dora)"
    )
    p.add_argument("--ranks", default="8", help="comma-separated ranks (default: 8)")
    p.add_argument(
        "--validation-prompts",
        default=None,
        help="grid rows, separated by '|' (default: the prompt and two variations)",
    )
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the grid images")
    p.add_argument("--sample-size", type=int, default=None, help="grid image size in pixels (default: the model's)")
    p.add_argument(
        "--eval-seeds",
        dest="eval_seeds",
        type=int,
        default=8,
        help="sampling seeds per prompt for subject fidelity, prompt fidelity and drift; 0 = no metrics "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--dino", default=None, help="DINO model for subject fidelity (default on the embedded model: its judge)"
    )
    p.add_argument(
        "--clip", default=None, help="CLIP model for prompt fidelity, CLIP-T (local folder or cached hub id)"
    )
    add_config_arguments(p)
    _add_threads(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "sweep",
        help="LoRA vs DoRA at several ranks and seeds: subject fidelity, prompt fidelity, drift",
        description="Train every (method, rank, seed) with identical settings, evaluate each on the same "
        "sampling seeds, and write sweep.md/csv/json and sweep.png (metrics against rank) under --output. "
        "Resumable: finished cells are read back. Without --data: the sample subject on the embedded model, "
        "judged by the toy world's judge.",
    )
    p.add_argument("--output", default="outputs/sweep", help="sweep folder (default: %(default)s)")
    p.add_argument("--data", default=None, help="subject folder (default: the sample subject)")
    p.add_argument("--prompt", default=None, help="instance prompt (default: 'a photo of sks toy')")
    p.add_argument(
        "--class-prompt", dest="class_prompt", default=None, help="class prompt: prior preservation and drift"
    )
    p.add_argument(
        "--scene-prompts",
        dest="scene_prompts",
        default=None,
        help="prompt-fidelity prompts, separated by '|' (needs --clip)",
    )
    p.add_argument("--model", default=None, help="base model (default: the embedded tiny model)")
    p.add_argument(
        "--methods", default="lora,dora", help="comma-separated: lora, dora, magnitude, dvora (default: %(default)s)"
    )
    p.add_argument("--ranks", default="4,8,16", help="comma-separated ranks (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=400, help="training steps per cell (default: %(default)s)")
    p.add_argument("--learning-rate", dest="learning_rate", type=float, default=3e-3, help="(default: %(default)s)")
    p.add_argument("--targets", default="attn+ff", help="layers to adapt (default: %(default)s)")
    p.add_argument(
        "--eval-seeds", dest="eval_seeds", type=int, default=16, help="sampling seeds per prompt (default: %(default)s)"
    )
    p.add_argument("--dino", default=None, help="DINO model for subject fidelity (local folder or cached hub id)")
    p.add_argument(
        "--clip", default=None, help="CLIP model for prompt fidelity, CLIP-T (local folder or cached hub id)"
    )
    p.add_argument("--overwrite", action="store_true", help="retrain finished cells made with other settings")
    _add_threads(p)
    p.set_defaults(func=_sweep)

    p = sub.add_parser(
        "analyze", help="weight-decomposition analysis (DoRA paper §3.2): ΔD vs ΔM per layer and checkpoint"
    )
    p.add_argument("runs", nargs="+", help="run folders, checkpoint folders, adapter files or fine-tuned UNet folders")
    p.add_argument(
        "--out", default="outputs/analysis", help="folder for decomposition.png/.csv/.json (default: outputs/analysis)"
    )
    p.add_argument("--model", default=None, help="base model (default: the one each run recorded)")
    p.add_argument("--layers", default=None, help="only these layers: comma-separated whole-name patterns, e.g. to_q")
    _add_threads(p)
    p.set_defaults(func=_analyze)

    p = sub.add_parser("demo", help="train LoRA and DoRA on the sample subject and write a side-by-side grid")
    p.add_argument("--output", default="outputs/demo", help="folder of the demo (default: outputs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    _add_threads(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser("app", help="the Gradio app: compare base | LoRA | DoRA, train, export")
    p.add_argument(
        "--model",
        default=None,
        help="base model: a local diffusers folder or cached hub id (default: the embedded tiny model)",
    )
    p.add_argument(
        "--outputs",
        default="outputs",
        help="workspace folder: runs, uploads and exports; every path typed in the app stays inside it "
        "(default: outputs)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for the network)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    _add_threads(p)
    p.set_defaults(func=_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .analysis import AnalysisError
    from .config import ConfigError
    from .data import DataError
    from .formats import AdapterFileError
    from .inject import AdapterError
    from .metrics import MetricsModelNotFound
    from .models import ModelNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (
        ConfigError,
        DataError,
        AdapterError,
        AdapterFileError,
        AnalysisError,
        ModelNotFoundError,
        MetricsModelNotFound,
        FileExistsError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
