"""Evaluation: detector-scored accuracies, erasure metrics, image grids."""
from .evaluate import evaluate, format_table, sample_grid
from .grid import check_grid_path, save_grid
from .metrics import erasure_metrics, harmonic_mean

__all__ = ["evaluate", "format_table", "sample_grid", "check_grid_path", "save_grid", "erasure_metrics", "harmonic_mean"]
