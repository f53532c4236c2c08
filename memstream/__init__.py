"""memstream: streaming episodic and long-term memory for AI models.

Importing this package is cheap on purpose: the heavy parts (Kafka, Beam, LanceDB,
Airflow) load only in the submodules that use them, so ``memstream.operators`` and
``memstream.kernels`` import on a machine that has nothing but torch and numpy.
"""

from memstream.errors import MemstreamError

__version__ = "0.1.0"
__all__ = ["MemstreamError", "Publisher", "Session", "__version__"]

# Public names served from submodules on first use, so `import memstream` stays light.
_LAZY = {"Publisher": "memstream.sdk", "Session": "memstream.sdk"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memstream' has no attribute {name!r}")
