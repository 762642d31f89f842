"""Attention kernels for lcv-train: dense attention dispatch and 3D block-sparse attention.

This package never imports ``lcv_train``. Importing it is cheap and has no side effects (Triton is only
imported when a Triton kernel is first called), because other libraries probe for a top-level package
named ``kernels`` (transformers' ``is_kernels_available``) and may import it.
"""
