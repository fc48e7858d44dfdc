"""Aggregators: the paper's Tables 1-7 from ``results/runs/`` (issue #6, #8)."""
