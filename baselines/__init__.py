"""Baseline compression methods, one file each (issue #5; specs in methods.md §2-§7).

Installed as ``apet_bench.baselines`` (a top-level module named ``baselines`` is taken on PyPI).
Each module registers its method class with :func:`apet_bench.methods.register_method`; the
registry imports this package, so a new file here only needs to be imported below.

==========  =========================================  ==============
registry    method                                     stage
==========  =========================================  ==============
fastv       FastV (ECCV 2024), methods.md §3            llm
pdrop       PyramidDrop (CVPR 2025), §5                 llm
sparsevlm   SparseVLM v1.5 (ICML 2025), §4              llm
visionzip   VisionZip (CVPR 2025), §2                   vision
tome        ToMe (ICLR 2023) inside the vision tower, §6 vision
downsample  token-grid downsampling reference row, §7   vision
==========  =========================================  ==============
"""

from apet_bench.baselines import (  # noqa: F401
    downsample,
    fastv,
    pdrop,
    sparsevlm,
    tome,
    visionzip,
)
