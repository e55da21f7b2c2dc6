"""Thin Prefect tasks, one per pipeline stage, wrapping :mod:`fairdiffusion` functions."""
