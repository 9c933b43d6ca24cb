"""The toy world the embedded tiny SDXL is pretrained on: rendering, pretraining, and its judge."""
