"""Processes working together: data parallelism and the stage pipeline."""
