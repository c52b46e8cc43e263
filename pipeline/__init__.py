"""nemo-pipe's engine: stage contract, keys, shards, resume, locks and publishing.

It computes nothing itself: the stages (the `stages` package, found through
:mod:`pipeline.registry`) do. Submodules load on demand, so importing this package is free.
"""
