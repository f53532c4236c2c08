"""Compute kernels of memstream: importable with torch and numpy alone (triton is optional)."""

from memstream.kernels import check
from memstream.kernels.fixed_query_attention import (attention_torch, attention_triton, fixed_query_attention,
                                                     triton_available)
from memstream.kernels.nearest_slot import nearest_slot, nearest_slot_torch, nearest_slot_triton

__all__ = ["attention_torch", "attention_triton", "check", "fixed_query_attention", "nearest_slot", "nearest_slot_torch",
           "nearest_slot_triton", "triton_available"]
