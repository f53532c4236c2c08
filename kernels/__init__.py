"""GPU kernels (Triton) with their torch reference implementations."""
