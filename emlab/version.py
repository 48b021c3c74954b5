"""emlab's version string, in the bottom layer so that any module may read it; ``emlab.__version__`` re-exports it.

>>> from emlab.version import __version__
>>> __version__.count(".")
2
"""

__version__ = "0.1.0"
