"""The one part of homering that is built: the window's graph hook in C (see homering/engine/evalhook.py).

Everything else is in pyproject.toml. ``_evalhook`` is a plain shared library (no Python API) that the
window engine loads with ctypes.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("homering.engine._evalhook", sources=["homering/engine/_evalhook.c"])])
