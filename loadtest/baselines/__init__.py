"""Baseline servers the benchmark compares exitserve against (same model store, same inputs)."""
