"""Visual-token compression methods: the ``TokenCompressor`` base class, its registry, and the built-ins.

Built-in methods: ``none`` (:class:`NoCompression`), ``random`` (:class:`RandomCompressor`) and ``apet``
(:class:`ApETCompressor`, the paper's method). The five baselines (``apet_bench.baselines``, imported
lazily by the registry) register themselves with :func:`register_method`.

Examples
--------
>>> from apet_bench.methods import available_methods, build_method
>>> "random" in available_methods()
True
>>> build_method("random", budget=0.25, seed=1).budget
0.25
"""

from apet_bench.methods.apet import ApETCompressor
from apet_bench.methods.base import (
    STAGE_ONE,
    STAGE_TWO,
    STAGES,
    TokenCompressor,
    UnknownMethodError,
    VisualSelection,
    available_methods,
    build_method,
    get_method_class,
    register_method,
)
from apet_bench.methods.none import NoCompression
from apet_bench.methods.random import RandomCompressor

__all__ = [
    "ApETCompressor",
    "STAGES",
    "STAGE_ONE",
    "STAGE_TWO",
    "NoCompression",
    "RandomCompressor",
    "TokenCompressor",
    "UnknownMethodError",
    "VisualSelection",
    "available_methods",
    "build_method",
    "get_method_class",
    "register_method",
]
