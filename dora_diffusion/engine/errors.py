"""The engine's errors, and which errors are the user's: only our own types, whose messages say what to change.

Anything else (a ``ValueError`` or ``KeyError`` from deep inside a library, a bug of ours) is an internal
error: logged with its traceback, and shown as an internal error, never as the user's mistake.
"""

from __future__ import annotations

from ..analysis.results import AnalysisError
from ..config import ConfigError
from ..inject import AdapterError
from ..subject_folder import DataError


class EngineError(ValueError):
    """A request the engine refuses; the message says what to change."""


class EngineBusy(EngineError):
    """The device is running another job (one generation, export or training at a time)."""


USER_ERRORS: tuple[type[BaseException], ...] = (EngineError, ConfigError, DataError, AdapterError, AnalysisError)
"""Our error types for bad input (``AdapterError`` includes ``AdapterFileError``); with the two of
``is_user_error`` that need the model libraries imported."""


def is_user_error(error: BaseException) -> bool:
    """``error`` is one of our own errors about the user's input: a request, an option, an image, an adapter
    file, a model that is not on disk. A builtin error (``ValueError``, ``FileExistsError``...) never is."""
    if isinstance(error, USER_ERRORS):
        return True
    from ..metrics import MetricsModelNotFound
    from ..models import ModelNotFoundError

    return isinstance(error, (ModelNotFoundError, MetricsModelNotFound))


def user_message(error: BaseException) -> str:
    """The message to show for ``error``: its own for the user's errors, else a short internal-error line
    (its traceback belongs in the server log)."""
    if is_user_error(error):
        return str(error)
    return f"Internal error ({type(error).__name__}: {error}); the details are in the server log."
