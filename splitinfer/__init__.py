"""splitinfer: cut a PyTorch model in two, run the head on the edge and the tail in the cloud."""

__version__ = "0.1.0"
