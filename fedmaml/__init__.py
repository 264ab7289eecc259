"""fedmaml: federated meta-learning (MAML, FOMAML, Meta-SGD, Reptile) on Flower and PyTorch."""

__version__ = "0.1.0"
