"""Sweeps: a grid of run configs over independent repetitions (spec, run, stats)."""
