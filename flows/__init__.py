"""Prefect flows: wiring of the stage tasks, nothing else."""
