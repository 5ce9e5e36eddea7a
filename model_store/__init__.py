"""The early-exit model as math (encoder + off-ramps + exit criteria), as an artifact (manifest,
safetensors, tokenizer, calibration) and how it is made (training recipes, data, calibration)."""
