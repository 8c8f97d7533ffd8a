"""Meta-World recipes: task sets, offline data (generation, storage, readers) and the DT sampler.

Nothing in ``maskmtl/`` imports this package; it needs the ``rl`` extra (metaworld, mujoco,
gymnasium) only for generation and evaluation, not for loading or sampling stored data.
"""
