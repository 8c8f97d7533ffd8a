"""maskmtl's Hydra launchers (``hydra/launcher=slurm`` and ``hydra/launcher=local``, see
``conf/hydra/launcher/``). Hydra accepts launcher classes only from the ``hydra_plugins`` namespace."""
