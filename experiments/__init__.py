"""Workloads (the prompts pushed through a model) and the benchmark scripts that use them."""
