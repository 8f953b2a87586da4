"""Built-in tasks with a known oracle, for demos and quality benchmarks."""
from .oracle import OracleTask

__all__ = ["OracleTask"]
