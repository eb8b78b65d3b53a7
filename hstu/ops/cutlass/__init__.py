"""CUTLASS kernel option: the external fused CUDA HSTU attention (hstu_attn package).

Only attention has a CUTLASS implementation; every other op runs TRITON under CUTLASS
(hstu.ops.kernel). See attention.py for the requirements, and docs/serving.md for installing.
"""
