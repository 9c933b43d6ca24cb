"""Jobs on the device, one at a time: a generation, an export, an analysis, or training runs in a
background thread (cancellable; its progress told by the trainer itself, through ``train``'s callback)."""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runs
from ..config import TrainConfig
from .errors import EngineBusy, is_user_error, user_message

log = logging.getLogger(__name__)

METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA"}
BUSY_TIMEOUT = 600  # seconds a job waits for the device before it is refused


@dataclass
class TrainProgress:
    state: str
    """'idle', 'running', 'finished', 'cancelled' or 'failed'."""
    message: str = ""
    method: str | None = None
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    its: float | None = None
    eta_seconds: float | None = None
    losses: list[tuple[str, int, float]] = field(default_factory=list)
    """(method, step, loss) for every step of the job."""
    validation: list[tuple[Path, str]] = field(default_factory=list)
    """(image, caption), oldest first."""
    runs: list[Path] = field(default_factory=list)


class TrainingJob:
    """One or two training runs in a background thread; ``cancel()`` stops after the current step.
    ``release`` is called once the thread ends; ``shown`` names a path for the messages."""

    def __init__(
        self, configs: Sequence[TrainConfig], release: Callable[[], Any], shown: Callable[[Path], str] = str
    ) -> None:
        self.configs = list(configs)
        self.results: list[Any] = []
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._stop = threading.Event()
        self._release = release
        self._shown = shown
        self._lock = threading.Lock()  # the trainer's reports (its thread) against progress() (the app's)
        self._losses: list[tuple[str, int, float]] = []
        self._validation: list[tuple[Path, str]] = []
        self._last: dict[int, tuple[int, float]] = {}  # config index: (step, loss) of its latest step
        self._seconds: dict[int, list[float]] = {}  # config index: its steps' wall times
        self._thread = threading.Thread(target=self._run, name="dora-diffusion-train", daemon=True)

    def start(self) -> TrainingJob:
        self._thread.start()
        return self

    def _report(self, index: int, report: Any) -> None:
        """``train``'s progress callback (a ``train.StepReport``) for ``configs[index]``."""
        method = self.configs[index].adapter.method
        with self._lock:
            if report.seconds is not None:  # a step (the end-of-run report brings the final images only)
                self._losses.append((method, report.step, report.loss))
                self._last[index] = (report.step, report.loss)
                self._seconds.setdefault(index, []).append(report.seconds)
            for image in report.images:
                step, seed = runs.parse_validation_name(Path(image).name) or (report.step, 0)
                self._validation.append((Path(image), f"{method} · step {step} · seed {seed}"))

    def _run(self) -> None:
        from ..train import train

        try:
            for index, config in enumerate(self.configs):
                if self._stop.is_set():
                    break
                result = train(
                    config,
                    should_stop=lambda step, loss: self._stop.is_set(),
                    progress=lambda report, index=index: self._report(index, report),
                )
                self.results.append(result)
                if result.stopped:
                    break
        except BaseException as e:  # reported in the UI; an internal error's traceback goes to the server log
            self.error = user_message(e)
            if is_user_error(e):
                log.warning("training refused: %s", e)
            else:
                log.error("training failed:\n%s", traceback.format_exc())
        finally:
            self.finished = time.time()
            self._release()

    @property
    def running(self) -> bool:
        return self.finished is None

    def cancel(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        if self.error:
            return "failed"
        if len(self.results) == len(self.configs) and not any(r.stopped for r in self.results):
            return "finished"
        return "cancelled"

    def progress(self) -> TrainProgress:
        """What the trainer has reported so far, and what it means for the run going on."""
        p = TrainProgress(state=self.state, runs=[Path(c.output) for c in self.configs])
        # the run going on (or the one that failed), else the last one that ran
        done = len(self.results)
        index = max(0, min(done if self.running or self.error else done - 1, len(self.configs) - 1))
        config = self.configs[index]
        p.method, p.max_steps = config.adapter.method, config.max_steps
        with self._lock:
            p.losses, p.validation = list(self._losses), list(self._validation)
            last, recent = self._last.get(index), list(self._seconds.get(index, [])[-10:])
        if last is not None:
            p.step, p.loss = last
        if recent:
            per_step = statistics.median(recent)
            p.its = 1.0 / per_step if per_step > 0 else None
            left = p.max_steps - p.step + sum(c.max_steps for c in self.configs[index + 1 :])
            p.eta_seconds = left * per_step
        name = METHOD_NAMES.get(p.method, p.method)
        if p.state == "running":
            p.message = f"{name}: step {p.step}/{p.max_steps}" if last else f"{name}: loading the model and the images…"
        elif p.state == "failed":
            p.message = f"Training failed: {self.error}"
        elif p.state == "cancelled":
            stopped = [r for r in self.results if r.stopped]
            where = f"; checkpoint kept at {self._shown(stopped[-1].adapter_file)}" if stopped else ""
            p.message = (
                f"Cancelled at {name} step {p.step}{where}. Resume it with `dora-diffusion train ... --resume latest`."
            )
        else:
            p.message = "Finished: " + ", ".join(self._shown(r.adapter_file.parent) for r in self.results)
        return p


class Device:
    """One job on the device at a time: ``use`` for a generation, an export or an analysis (waiting for the
    one going on), ``start_training`` for training runs, which hold it until their thread ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job: TrainingJob | None = None

    @property
    def training(self) -> bool:
        return self.job is not None and self.job.running

    def refuse_if_training(self) -> None:
        if self.training:
            raise EngineBusy("A training run is already going; wait for it to finish or cancel it.")

    @contextlib.contextmanager
    def use(self, what: str) -> Iterator[None]:
        if self.training:
            raise EngineBusy(f"Cannot {what} while a training run uses the device; wait for it to finish or cancel it.")
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise EngineBusy(f"Cannot {what}: the device stayed busy for {BUSY_TIMEOUT // 60} minutes.")
        try:
            yield
        finally:
            self._lock.release()

    def start_training(self, configs: Sequence[TrainConfig], shown: Callable[[Path], str] = str) -> TrainingJob:
        self.refuse_if_training()
        if not self._lock.acquire(blocking=False):
            raise EngineBusy("The device is generating images; start training again in a moment.")
        try:
            self.job = TrainingJob(configs, release=self._lock.release, shown=shown).start()
        except BaseException:
            self._lock.release()
            raise
        return self.job

    def cancel_training(self) -> bool:
        """Ask the running job to stop after its current step (it keeps a checkpoint); False if none runs."""
        if not self.training:
            return False
        self.job.cancel()
        return True

    def training_progress(self) -> TrainProgress:
        return self.job.progress() if self.job else TrainProgress(state="idle", message="No training run yet.")
