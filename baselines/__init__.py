"""Baseline compression methods (FastV, SparseVLM, PDrop, VisionZip, ToMe), one file each.

Installed as ``apet_bench.baselines`` (a top-level module named ``baselines`` is taken on PyPI).
Each module registers its method class with :func:`apet_bench.methods.register_method`; the
registry imports this package, so a new file here only needs to be imported below.
"""
from apet_bench.baselines import visionzip  # noqa: E402,F401  (issue #5: VisionZip)
from apet_bench.baselines import downsample  # noqa: E402,F401  (issue #5: downsample reference row)
from apet_bench.baselines import sparsevlm  # noqa: E402,F401  (issue #5: SparseVLM)
from apet_bench.baselines import fastv  # noqa: E402,F401  (issue #5: FastV)
from apet_bench.baselines import pdrop  # noqa: E402,F401  (issue #5: PyramidDrop)
from apet_bench.baselines import tome  # noqa: E402,F401  (issue #5: ToMe, methods.md §6)
