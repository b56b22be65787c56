"""Sweeps: `grid` (what experiment files import; no JAX), `runner` (runs the points), `report`
(sweep.csv, the markdown table, sweep.png). Importing this package imports the grid only."""

from alexnet_jax.sweep.grid import SEED_KEY, Point, axis, override_text, point_name, product, zipped

__all__ = ["SEED_KEY", "Point", "axis", "override_text", "point_name", "product", "zipped"]
