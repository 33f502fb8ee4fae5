"""Parallelism: one model over several processes or devices (tensor and pipeline parallel rank groups) and the
planner that chooses how to split a model over the devices a machine has."""
