"""graft: add vision to language-model backbones and train the result, CPU to cluster.

From Python: `graft.recipe`, `graft.train`, `graft.load` (graft/api.py); from a shell: `graft`.
"""

__version__ = "0.1.0"
__all__ = ["recipe", "train", "load", "Run"]


def __getattr__(name: str):
    if name in __all__:  # imported on first use, so that `graft --help` stays quick
        from graft import api

        return getattr(api, name)
    raise AttributeError(f"module 'graft' has no attribute {name!r}")
