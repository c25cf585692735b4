"""Checkpoints to loaded models: the model manager, assembly from files, separate modules, the demo model."""
