"""DLRM-HSTU ranking: config, data, model, kernels and Ray training."""

__version__ = "0.1.0"
