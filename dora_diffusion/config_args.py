"""Where a ``TrainConfig``'s options come from: a TOML/YAML/JSON config file, the command line (one
``--option`` per flat option of ``config.options_of``) and, when resuming, the run's saved options."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import OPTION_NAMES, ConfigError, TrainConfig, options_of


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys of a TOML, YAML or JSON config file (a ``[train]`` table / ``train:`` mapping, or top level)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config: {path} must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config: {path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a table of options")
    data = data.get("train", data)
    normalised = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - OPTION_NAMES)
    if unknown:
        raise ConfigError(f"config: {path} has unknown option(s) {', '.join(unknown)}")
    return normalised


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type = TrainConfig, required: tuple[str, ...] = ()
) -> None:
    """One ``--option`` per flat option, grouped, with the option's help; defaults left to the dataclass."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in options_of(cls):
        group = groups.setdefault(o.group, parser.add_argument_group(o.group))
        flag = "--" + o.name.replace("_", "-")
        shown = "" if o.default in (None, "", False) else f" (default: {o.default})"
        text = (o.help + shown).replace("%", "%%")  # argparse formats help with %: "~4% slower" is text
        if o.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(
                flag,
                type=o.type,
                default=argparse.SUPPRESS,
                choices=o.choices,
                help=text,
                required=o.name in required,
            )


def resumed_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options the run that ``values`` resume was started with: its checkpoint's (``resume`` a
    checkpoint folder) or its output folder's ``training_config.json`` (``resume = "latest"``); ``{}``
    when not resuming or nothing was saved. So ``--output X --resume latest`` continues run X as it was."""
    from . import runs

    resume = values.get("resume")
    if not resume:
        return {}
    run = Path(values.get("output") or TrainConfig.output)
    source = runs.config_file(run) if resume == "latest" else Path(resume) / runs.STATE_NAME
    if not source.is_file():
        return {}
    try:
        saved = runs.read_run_config(run) if resume == "latest" else runs.read_checkpoint_state(resume)["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"resume: {source} could not be read ({e})") from None
    names = OPTION_NAMES - {"resume", "overwrite"}
    return {k: v for k, v in saved.items() if k in names}


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """The config file's values (``args.config``), overridden by the options given on the command line;
    when resuming, the run's saved options fill in what neither gives."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    names = {o.name for o in options_of(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    if cls is TrainConfig:
        values = {**resumed_options(values), **values}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
