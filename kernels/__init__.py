"""Compute kernels of memstream: importable with torch and numpy alone (triton is optional)."""

from memstream.kernels import check
from memstream.kernels.fixed_query_attention import (attention_torch, attention_triton, fixed_query_attention,
                                                     triton_available)

__all__ = ["attention_torch", "attention_triton", "check", "fixed_query_attention", "triton_available"]
