"""allocd — a streaming aggregation daemon for CloudZero allocation telemetry."""

__version__ = "0.1.0"
__all__ = ["__version__"]
