"""Benchmarks, run from a checkout with ``python tools/bench.py NAME [key=value ...]`` (not part of
the installed packages).

- ``benchmarks.core``: the core's measurements for any model (masked vs dense step, one mask
  update, export vs masked model) and the generic-transformer benchmarks (core only).
- ``benchmarks.harmodt``: the Prompt-DT of the harmodt recipe (masked step, mask update, batched
  evaluation, gradient surgery step, export).
- ``benchmarks.digits``: score stability over the number of gradient batches (digits recipe).
- ``benchmarks.metaworld``: the Decision Transformer segment sampler.
"""
