"""Benchmarks (`robustsweep bench ...`): speed is measured here, never in tests."""
