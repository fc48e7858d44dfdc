"""The five baselines of issue #5 (FastV, SparseVLM, PDrop, VisionZip, ToMe); importing this package registers them."""

from apet_bench.baselines import tome  # noqa: F401  (ToMe, methods.md §6)
