"""graft: add vision to language-model backbones and train the result, CPU to cluster."""

__version__ = "0.1.0"
