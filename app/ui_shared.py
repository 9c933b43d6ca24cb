"""What every tab of the app shares: error display, run choices, paths as shown, images as read."""

from __future__ import annotations

import functools
import html
import logging
from pathlib import Path

import gradio as gr
from PIL import Image

from dora_diffusion.engine import Engine, is_user_error, user_message

log = logging.getLogger("dora_diffusion.app")

GRADIO_TMP = ".gradio-tmp"
"""Gradio's own files (uploads as received, generated images, downloads), in the workspace."""

NONE = ("none", "")


def shown(fn):
    """Errors become a message in the UI (``gr.Error``), never a traceback; unexpected ones are logged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            if not is_user_error(e):  # an internal error: its traceback goes to the server log
                log.exception("%s failed", fn.__name__)
            raise gr.Error(html.escape(user_message(e), quote=False), print_exception=False) from None

    return wrapper


def run_choices(engine: Engine) -> list[tuple[str, str]]:
    return [NONE] + [(r.label, r.name) for r in engine.list_runs()]


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (as the user typed it)."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def open_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:  # half-written by the training thread
        return None
