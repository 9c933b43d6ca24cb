"""``dora-diffusion``: a thin shell over the library; every subcommand calls one function."""

from __future__ import annotations

import argparse
import os
import sys

from . import cli_parser
from .cli_commands import COMMANDS, set_threads


def _train(args: argparse.Namespace) -> int:
    from .config_args import config_from_args
    from .train import train

    config = config_from_args(args)
    set_threads(args, config.model)
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


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (``cli_parser``), wired to its handler."""
    return cli_parser.build_parser({"train": _train, **COMMANDS})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .analysis import AnalysisError
    from .config import ConfigError
    from .formats import AdapterFileError
    from .inject import AdapterError
    from .metrics import MetricsModelNotFound
    from .models import ModelNotFoundError
    from .subject_folder import DataError

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
