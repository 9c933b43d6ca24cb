import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny models: one thread is as fast, and immune to OpenMP oversubscription when the machine is
# shared (seen here: 3x slower with 2 threads under load). Override with OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy

import pytest
import torch

from helpers import SAMPLE, free_port, load_app_module, write_adapter

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_components():
    """The in-memory tiny SDXL components (built once; tests deep-copy what they change)."""
    from dora_diffusion.models import tiny_sdxl_components

    return tiny_sdxl_components(seed=0)


@pytest.fixture
def tiny_pipe(tiny_components):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight tiny SDXL saved as a diffusers folder (built once): its path."""
    from dora_diffusion.models import build_tiny_sdxl

    return str(build_tiny_sdxl(tmp_path_factory.mktemp("model") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_components, tiny_model):
    """The app on a free localhost port (in a thread), with a LoRA and a DoRA run in its workspace."""
    from dora_diffusion.engine import Engine

    ws = tmp_path_factory.mktemp("workspace")
    write_adapter(tiny_components, ws / "demo" / "lora", "lora", seed=1)
    write_adapter(tiny_components, ws / "demo" / "dora", "dora", seed=2)
    engine = Engine(model=tiny_model, workspace=ws)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GRADIO_TEMP_DIR", raising=False)  # the app sets it; later tests get it back as it was
        app = load_app_module().serve(engine, port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            yield app, engine
        finally:
            app.close()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A folder of the sample subject's first four files: three photos and one caption sidecar."""
    import shutil

    folder = tmp_path_factory.mktemp("data")
    for p in sorted(SAMPLE.iterdir())[:4]:
        shutil.copy(p, folder / p.name)
    return str(folder)
