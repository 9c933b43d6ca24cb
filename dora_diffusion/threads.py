"""How many CPU threads torch uses: chosen once per process, on purpose, and said in the log.

torch's default (one thread per core) is wrong for a shared machine and for small models: every op
then pays thread start-up and synchronisation, and a core taken by another process stalls them all.
Measured on a 2-core machine while another process used the CPU: one generation on the embedded tiny
model took 19.6 s with two threads and 0.7 s with one.
"""

from __future__ import annotations

import os

from .config import ConfigError

MAX_DEFAULT_THREADS = 4


def choose_threads(requested: int | None = None, *, model: str | None = None) -> tuple[int, str]:
    """``(threads, why)``: ``requested`` (``--threads``) if given, else ``OMP_NUM_THREADS`` if set, else
    1 for the embedded tiny model (``model`` None) and ``min(4, cpu count)`` for a real one."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"threads: must be at least 1, got {requested}")
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    if model is None:
        # The tiny model's matrices are too small for threads to pay: per-op overhead dominates.
        return 1, "the embedded tiny model runs fastest on one"
    # A real SDXL does use threads, but more than a few on a shared CPU mostly wait for each other.
    cpus = os.cpu_count() or 1
    return min(MAX_DEFAULT_THREADS, cpus), f"min({MAX_DEFAULT_THREADS}, {cpus} CPUs)"


def set_torch_threads(requested: int | None = None, *, model: str | None = None) -> int:
    """Set torch's intra-op thread count as ``choose_threads`` says, print it, and return it."""
    import torch

    threads, why = choose_threads(requested, model=model)
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} ({why})")
    return threads


def generation_threads(requested: int | None = None) -> tuple[int, str]:
    """Threads for batched generation on the embedded tiny model: ``choose_threads`` when ``--threads`` or
    ``OMP_NUM_THREADS`` say; else two when the machine has them and the 1-minute load average leaves a core
    free (batches of 16 prompts are big enough for a second thread to pay: 32 images in 5.5 s against 9 s on
    one, measured on an idle 2-core machine), one otherwise (a busy core stalls every op of a thread team)."""
    if requested is not None or os.environ.get("OMP_NUM_THREADS", "").strip():
        return choose_threads(requested)
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1, "no load average to tell whether a second core is free"
    if cpus >= 2 and load < cpus - 0.5:
        return 2, f"batched generation, load average {load:.1f} on {cpus} CPUs"
    return 1, f"load average {load:.1f} on {cpus} CPUs: no core to spare"
