"""Evaluation library: paired statistics and plots for comparing models."""
