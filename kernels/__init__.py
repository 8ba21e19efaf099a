"""Fused Triton attention kernels, installed as scaleinv_dist.kernels."""
