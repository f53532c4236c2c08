"""memstream: streaming episodic and long-term memory for AI models.

The public API, re-exported here (as httpx does); everything else is reachable from its
package::

    from memstream import Publisher, Memory, LongTermStore, Settings, MemstreamError

Importing this package is cheap on purpose: each name below loads its module on first use, so
``import memstream`` pulls in neither Kafka, Beam, LanceDB, Airflow nor torch, and
``memstream.operators`` and ``memstream.kernels`` import on a machine that has nothing but torch
and numpy.
"""

from memstream.errors import *  # noqa: F401,F403  (the exception hierarchy is part of the API)
from memstream.errors import __all__ as _errors
from memstream.settings import Settings

__version__ = "0.1.0"

# Public names served from submodules on first use, so `import memstream` stays light.
_LAZY = {
    "Publisher": "memstream.sdk", "Session": "memstream.sdk",
    "Memory": "memstream.read.memory", "ReadResult": "memstream.read.memory", "Fragment": "memstream.read.memory",
    "LongTermStore": "memstream.longterm.store",
    "SigningKey": "memstream.crypto.keys", "KeyRing": "memstream.crypto.keys",
}
__all__ = ["Settings", "__version__", *_LAZY, *_errors]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memstream' has no attribute {name!r}")
