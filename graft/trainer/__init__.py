"""The trainer: the loop (loop.py), optimiser, checkpoints, metrics, FLOPs, parallelism, runtime.

Named `trainer`, not `train`, so that `graft.train(cfg, out)` stays the Python API's function
(graft/api.py) whichever of these modules has been imported.
"""
