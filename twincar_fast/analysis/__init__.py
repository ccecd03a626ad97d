"""Judging a trained model: metrics, evaluation, interpretation, Grad-CAM++, plots and the report."""
