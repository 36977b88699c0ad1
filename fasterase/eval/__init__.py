"""Evaluation: detector-scored accuracies, erasure metrics, image grids."""
from .evaluate import evaluate, format_table
from .grid import save_grid
from .metrics import erasure_metrics, harmonic_mean

__all__ = ["evaluate", "format_table", "save_grid", "erasure_metrics", "harmonic_mean"]
