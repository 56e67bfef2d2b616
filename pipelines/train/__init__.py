"""Training: the Ray Train driver and its worker loop, the MLflow run, checkpoints, the row stream, DDP helpers,
and ``train-local`` (one process, core only)."""
