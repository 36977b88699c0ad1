"""Evaluation: detector-scored accuracies, erasure metrics, image grids."""
from .evaluate import evaluate, format_table, sample_grid
from .grid import save_grid
from .metrics import erasure_metrics, harmonic_mean

__all__ = ["evaluate", "format_table", "sample_grid", "save_grid", "erasure_metrics", "harmonic_mean"]
