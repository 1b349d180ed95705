"""robustsweep: robustness sweeps of inference-time defenses, one Parquet row per example."""

__version__ = "0.1.0"
