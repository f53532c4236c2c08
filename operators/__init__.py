"""Compression operators: the learned 4,096 -> 256 summariser and the Beam transforms around it."""
