"""Training stage: presets, data, loop and checkpoints."""
