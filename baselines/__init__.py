"""Baseline compression methods, one file each, installed as ``apet_bench.baselines``.

The registry imports every module of this package (``apet_bench.methods.base.discover_methods``), so a
new method is one file here (its class decorated with ``@register_method("<name>")``) plus its
``configs/method/<name>.yaml``; nothing is listed in this file. Each module's docstring gives its
source (official repository, file and commit).
"""
