"""Training: the loop (loop.py), optimiser, checkpoints, metrics, FLOPs, runtime.

`graft.train(cfg, out)` is also the Python API's entry point (graft/api.py). Importing any module
of this package makes `graft.train` this package, which would hide that function; so the package
itself is callable and hands the call to the loop (as api.train does).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from graft.train.loop import train  # on call: importing the package must not load the trainer

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
