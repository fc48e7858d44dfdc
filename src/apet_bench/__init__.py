"""apet-bench: a reproducible harness for training-free visual-token compression in VLMs.

Built around ApET (Approximation-Error guided Token compression, CVPR 2026). The library holds the
model adapters (``apet_bench.models``), the compression methods (``apet_bench.methods``; the five
baselines live in ``apet_bench.baselines``), the lmms-eval integration (``apet_bench.eval``), the local
data converters (``apet_bench.data``) and the results store (``apet_bench.results``).
"""

__version__ = "0.1.0"
