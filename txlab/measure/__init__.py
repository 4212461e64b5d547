"""Measuring one trial: devices, building a step (`step`), the memory monitor (`memory`), budgets
(`budget`), one measured trial (`trial`) and inference trials (`inference`), fake-tensor estimation
(`fake`, `estimate`, `planning`), the closed-form activation formula (`formula`) and FLOPs (`throughput`)."""
