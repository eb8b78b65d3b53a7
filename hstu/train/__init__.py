"""Distributed training on Ray Train: driver (trainer.py), worker loop (loop.py), sharding,
optimizers, checkpoints, evaluation, MLflow tracking and progress output (docs/training.md)."""
