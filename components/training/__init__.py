"""Training the item counter, one job per module.

:mod:`.config` (settings, file names), :mod:`.losses`, :mod:`.loop` (model, optimizer, the epoch
loop), :mod:`.checkpoint` (run start, resume), :mod:`.splits`, :mod:`.decision`, :mod:`.export`,
:mod:`.fit` (one fit), :mod:`.contrastive` (SimCLR stage), :mod:`.stages` (pretraining, fit, refit),
:mod:`.throughput`, :mod:`.cli`. ``python -m components.train`` is the command line.
"""
