"""Plots (matplotlib, Agg backend): kept apart from the computations they draw."""

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers / CI
