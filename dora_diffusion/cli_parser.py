"""The ``dora-diffusion`` command line: every subcommand's arguments and help; the handlers are given to
``build_parser`` (``cli`` wires them), so the arguments read without the code they run."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .demo import SNR_GAMMA

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


def build_parser(handlers: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The ``dora-diffusion`` parser; each subcommand's ``func`` is ``handlers[name]`` (``train``, ``tiny_model``,
    ...: the handler's name)."""
    from .config_args import add_config_arguments

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
    p.set_defaults(func=handlers["train"])

    p = sub.add_parser(
        "tiny-model", help="build the tiny SDXL-architecture pipeline with random weights (for fast tests)"
    )
    p.add_argument("path", help="folder to write (must not exist, or be empty, or hold an older tiny model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    _add_threads(p)
    p.set_defaults(func=handlers["tiny_model"])

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
    p.set_defaults(func=handlers["pretrain_tiny"])

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
    p.set_defaults(func=handlers["export"])

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
    p.set_defaults(func=handlers["verify"])

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
    p.set_defaults(func=handlers["compare"])

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
    p.add_argument(
        "--snr-gamma",
        dest="snr_gamma",
        type=float,
        default=SNR_GAMMA,
        help="min-SNR-gamma loss weighting, as the demo trains (0: off; default: %(default)s)",
    )
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
    p.set_defaults(func=handlers["sweep"])

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
    p.set_defaults(func=handlers["analyze"])

    p = sub.add_parser("demo", help="train LoRA and DoRA on the sample subject and write a side-by-side grid")
    p.add_argument("--output", default="outputs/demo", help="folder of the demo (default: outputs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    _add_threads(p)
    p.set_defaults(func=handlers["demo"])

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
    p.set_defaults(func=handlers["app"])
    return parser
