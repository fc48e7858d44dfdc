"""Visual-token compression methods: the ``TokenCompressor`` base class and its registry.

Methods are discovered, never listed here: every module of this package and of
``apet_bench.baselines``, and every entry point of the group ``apet_bench.methods`` (another installed
distribution), is imported before the registry is read (:func:`~apet_bench.methods.base.discover_methods`),
and each registers its class with :func:`register_method`. A registered class is also reachable as an
attribute of this package under its class name (``from apet_bench.methods import <ClassName>``).

Examples
--------
>>> from apet_bench.methods import available_methods, build_method
>>> "none" in available_methods()
True
>>> build_method("none").stage
'none'
"""

from typing import Any

from apet_bench.methods.base import (
    ENTRY_POINT_GROUP,
    STAGE_ONE,
    STAGE_TWO,
    STAGES,
    MethodImportError,
    TokenCompressor,
    UnknownMethodError,
    VisualSelection,
    available_methods,
    build_method,
    discover_methods,
    get_method_class,
    register_method,
    registered_classes,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "STAGES",
    "STAGE_ONE",
    "STAGE_TWO",
    "MethodImportError",
    "TokenCompressor",
    "UnknownMethodError",
    "VisualSelection",
    "available_methods",
    "build_method",
    "discover_methods",
    "get_method_class",
    "register_method",
    "registered_classes",
]


def __getattr__(name: str) -> Any:
    """A registered method class by its class name (e.g. the built-in classes), after discovery.

    Raises
    ------
    AttributeError
        When no registered class has that name.
    """
    for cls in registered_classes():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'apet_bench.methods' has no attribute {name!r}")
