"""Transformer training under Ray Train: params, schedules, metrics, the worker and the driver."""
