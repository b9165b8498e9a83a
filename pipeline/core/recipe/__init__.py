"""Recipes: the schema of their keys, loading them (extends, validation), sweeps, and the checks across keys."""
