"""Operators over latent streams: the 4096->256 compressor (model, checkpoint, evaluation).

Importable with torch and numpy alone; training data (MiniLM) loads only inside the commands.
"""

from memstream.operators.checkpoint import (DEFAULT_CHECKPOINT, load_compressor, load_default, save_compressor)
from memstream.operators.model import Compressor, CompressorConfig

__all__ = ["Compressor", "CompressorConfig", "DEFAULT_CHECKPOINT", "load_compressor", "load_default", "save_compressor"]
