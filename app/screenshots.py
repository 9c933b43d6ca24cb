"""The README's screenshots of the app, taken in headless Chromium (Playwright) on the embedded tiny model.

    python app/screenshots.py --out docs/screenshots [--workspace DIR] [--chromium /usr/bin/chromium]

In a workspace (default: a temporary one): trains a short LoRA and DoRA on the sample subject
(``demo/lora``, ``demo/dora``) unless they are there, serves the app, then per tab: Compare after a
generation and a measurement, Train after a short run started from the UI, Export after an export,
Analysis of the demo's runs. With ``--workspace outputs`` after ``make demo``, the demo's own runs are used.
PNGs over 300 KB are palette-quantised.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_BYTES = 300_000


def save_small(png: bytes, path: Path) -> None:
    """Write ``png``; when over ``MAX_BYTES``, as a 256-colour palette image (UI screenshots survive that well)."""
    import io

    from PIL import Image

    if len(png) > MAX_BYTES:
        out = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            out, "PNG", optimize=True
        )
        png = out.getvalue()
    path.write_bytes(png)
    print(f"{path}: {len(png) / 1000:.0f} KB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/screenshots", help="folder for the PNGs (default: docs/screenshots)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--workspace", default=None, help="workspace to use and keep (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the demo runs (default: 40)")
    parser.add_argument(
        "--size", type=int, default=None, help="image size of the comparison (default: the model's native size)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from main import serve

    from dora_diffusion.engine import Engine, TrainRequest

    with tempfile.TemporaryDirectory(prefix="dora-diffusion-shots-") as tmp:
        root = Path(args.workspace).resolve().parent if args.workspace else Path(tmp)
        os.chdir(root)  # the header shows the workspace relative to here
        engine = Engine(workspace=Path(args.workspace).name if args.workspace else "outputs")
        if engine.default_runs() != ("demo/lora", "demo/dora"):
            folder, _ = engine.use_sample_subject()
            job = engine.start_training(
                TrainRequest(
                    data=engine.relative(folder),
                    prompt="a photo of sks toy",
                    name="demo",
                    method="both",
                    steps=args.steps,
                    learning_rate=1e-3,
                    resolution=64,
                    validation_steps=0,
                    report_to="none",
                )
            )
            job.wait()
            assert job.state == "finished", job.progress().message
        run_name = next(f"toy{n or ''}" for n in range(100) if not (engine.workspace / f"toy{n or ''}").exists())
        app = serve(engine, port=None, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=FLAGS)
                page = browser.new_page(viewport={"width": 1360, "height": 940})
                page.goto(app.local_url)
                page.wait_for_selector("#generate")

                # Compare: base | LoRA | DoRA, preselected demo runs, the same seed
                for side in ("width", "height"):
                    box = page.locator(f"#{side} input[type=number]")
                    box.fill(str(args.size or engine.native_size()))
                    box.press("Enter")
                for _ in range(2):  # the second time with warm caches: representative times
                    page.locator("#generate").click()
                    time.sleep(1)
                    page.wait_for_function(
                        "!/processing|queue/.test(document.querySelector('#compare-dora').innerText)", timeout=120_000
                    )
                    for key in ("base", "lora", "dora"):
                        page.wait_for_selector(f"#compare-{key} img", timeout=120_000)
                    page.wait_for_function("document.querySelector('#status').innerText.includes('Seed')")
                    time.sleep(1)
                # ... and measured: subject fidelity, subject drawn, drift, which adapter is ahead
                page.locator("#measure").click()
                page.wait_for_function(
                    "document.querySelector('#scores').innerText.includes('Measured')", timeout=600_000
                )
                time.sleep(1)
                save_small(page.screenshot(full_page=True), out / "compare.png")

                # Train: the sample subject, both methods, a short run started from the UI
                page.get_by_role("tab", name="Train").click()
                page.get_by_role("button", name="Use the sample subject (sks toy)").click()
                page.wait_for_function("document.querySelector('#scan textarea').value.includes('image(s) used')")
                page.get_by_label("Run name").fill(run_name)
                page.locator("#train-steps input").fill("24")
                page.get_by_label("Learning rate").fill("0.001")
                page.locator("#start").click()
                # while DoRA trains: progress bar, both loss curves, validation images so far
                page.wait_for_function(
                    "(/DoRA: step (\\d+)/.exec(document.querySelector('#progress').innerText) || [0, 0])[1] >= 13",
                    timeout=600_000,
                )
                time.sleep(1.5)
                save_small(page.screenshot(full_page=True), out / "train.png")
                page.wait_for_function(
                    f"document.querySelector('#progress').innerText.includes('Finished: {run_name}/lora')",
                    timeout=600_000,
                )

                # Export: the DoRA run, kohya format
                page.get_by_role("tab", name="Export").click()
                page.get_by_label("comfyui: ComfyUI, Forge").check()
                page.locator("#export").click()
                page.wait_for_function("document.body.innerText.includes('MB)')", timeout=300_000)
                time.sleep(1)
                save_small(page.screenshot(full_page=True), out / "export.png")

                # Analysis: the weight-decomposition plot of the demo's LoRA and DoRA
                page.get_by_role("tab", name="Analysis").click()
                page.locator("#analyze").click()
                page.wait_for_function("document.body.innerText.includes('Pearson r')", timeout=300_000)
                time.sleep(1)
                save_small(page.screenshot(full_page=True), out / "analysis.png")
                browser.close()
        finally:
            app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
