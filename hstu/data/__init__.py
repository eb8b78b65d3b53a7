"""Samples: schema (schema.py), KuaiRand converter (kuairand.py), synthetic generator
(synthetic.py), row checks (validate.py) and the Ray Data pipeline to JaggedBatch (pipeline.py).

Submodules are imported on use: pipeline.py pulls in torch and TorchRec, which `prepare`
does not need.
"""
