"""Build the Cython parts (the delta kernel, maps without descriptors); the rest: pyproject."""

import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# Stripped on Linux: the symbols of an optimised kernel help no user and weigh the wheel.
LINK_ARGS = ["-s"] if sys.platform.startswith("linux") else []

extensions = [
    Extension("arraysnap._delta", ["src/arraysnap/_delta.pyx"], extra_compile_args=["-O3"],
              extra_link_args=LINK_ARGS),
    Extension("arraysnap._mapping", ["src/arraysnap/_mapping.pyx"], extra_link_args=LINK_ARGS),
    Extension("arraysnap._leaves", ["src/arraysnap/_leaves.pyx"], extra_compile_args=["-O2"],
              extra_link_args=LINK_ARGS),
    # Reads ndarray fields in C: built against NumPy's headers (NumPy 2's are compatible
    # with NumPy 1.26 at run time).
    Extension("arraysnap._roster", ["src/arraysnap/_roster.pyx"], extra_compile_args=["-O2"],
              extra_link_args=LINK_ARGS, include_dirs=[numpy.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]),
]

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
