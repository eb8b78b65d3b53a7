"""This project's Triton kernels; each module mirrors a module of hstu/ops/pytorch/."""
