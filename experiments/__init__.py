"""Thin absl drivers over the lossland library: train, eos, sweep_n, subspace, reproduce, report."""
