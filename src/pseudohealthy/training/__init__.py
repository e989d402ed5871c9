"""Training: one ensemble member per fold.

Modules: :mod:`.config` (TrainConfig, preset families, what a resume must match, member
folders and seeds), :mod:`.distributed` (torchrun launches and torch.distributed helpers),
:mod:`.state` (the resumable state in ``train_state/``), :mod:`.logs` (early stopping, log.csv,
tensorboard), :mod:`.validation` (validation loss and AP during training) and :mod:`.loop`
(:func:`~.loop.train_member`, :func:`~.loop.train_ensemble` and writing the member folder).
"""
