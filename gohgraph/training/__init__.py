"""Training: the flat loop, its config, optimizer, schedules, checkpoints, metrics, interrupts and presets."""
