"""Reference implementations: plain PyTorch, obviously correct, padded where that is simplest."""
