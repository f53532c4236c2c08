"""memstream: streaming episodic and long-term memory for AI models.

Importing this package is cheap on purpose: the heavy parts (Kafka, Beam, LanceDB,
Airflow) load only in the submodules that use them, so ``memstream.operators`` and
``memstream.kernels`` import on a machine that has nothing but torch and numpy.
"""

from memstream.errors import MemstreamError

__version__ = "0.1.0"
__all__ = ["MemstreamError", "__version__"]
