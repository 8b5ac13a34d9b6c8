"""Benchmark evaluation as the papers report it: prompt sets, scorers, paired sampling, statistics and reports.

`python -m pnapo_jax.evaluate` drives these modules; each has one job and knows nothing of training.
"""
