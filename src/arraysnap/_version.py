"""The package version, in a leaf module that everything may import without a cycle.

>>> from arraysnap._version import __version__
>>> __version__.count(".")
2
"""

__version__ = "0.1.0"
