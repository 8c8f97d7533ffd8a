"""The single place where config nodes become objects, and the checks that run before training.

``build(cfg.<group>, key, **runtime)`` is the only caller of ``hydra.utils.instantiate`` in the
project: runtime values (total steps, the model) are passed here, never written back into cfg.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


def build(node: DictConfig, key: str, **runtime: Any) -> Any:
    """Instantiate ``node`` (which has a ``_target_``), adding runtime-only keyword arguments.

    Errors from the constructor are re-raised as ``ConfigError`` naming ``key``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if node is None or "_target_" not in node:
        raise ConfigError(f"{key}: expected a config node with a _target_, got {node!r}")
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{key} ({node._target_}): {cause}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} ({node._target_}): {e}") from e


def choose_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise a torch device string."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"device={spec!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available on this machine (use device=auto or cpu)")
    return dev


def require(cfg: DictConfig, key: str, check, expected: str) -> Any:
    """Read ``cfg.<key>`` (dotted) and fail with a message naming the key unless ``check(value)``."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if value is None or not check(value):
        raise ConfigError(f"{key}={value!r}: expected {expected}")
    return value


# Value checks for ``require`` and ``check_keys``: YAML and the command line give ints, floats,
# bools and strings; a bool is never taken for a number, nor a string for a bool.
def is_int(lo: int | None = None, hi: int | None = None):
    return lambda v: (isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
                      and (hi is None or v <= hi))


def is_number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """A finite int or float in the range (``lo_open`` / ``hi_open``: the bound itself excluded)."""
    import math

    def check(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)
    return check


def is_bool(v) -> bool:
    return isinstance(v, bool)


def check_keys(cfg: DictConfig, table) -> None:
    """Check every ``(key, check, expected)`` row of ``table`` (keys absent from ``cfg`` are
    skipped: a recipe without that key) and raise one ConfigError listing every bad key."""
    bad = []
    for key, check, expected in table:
        if OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        try:
            ok = check(value)
        except Exception:  # a check of another type's value (len of an int ...) fails the key
            ok = False
        if not ok:
            bad.append(f"{key}={value!r}: expected {expected}")
    if len(bad) == 1:
        raise ConfigError(bad[0])
    if bad:
        raise ConfigError(f"{len(bad)} config values cannot work:\n  " + "\n  ".join(bad))


class Masking:
    """The masking components a recipe needs, built from the config's groups.

    Attributes: ``masks`` (MaskSet), ``model`` (MaskedModel), ``initializer``, ``scorer``,
    ``scheduler``, ``grouper``, ``updater`` (MaskUpdater), ``needs_grouping`` (the grouper makes
    fewer groups than tasks: masks start all-ones, one group per task, until ``group_tasks``),
    ``structures`` (a ``StructureMap`` when ``masking.granularity`` is ``unit`` or ``head``,
    else None).

    ``example_inputs`` (what ``model`` is called with: a tensor, a tuple, or a dict of keyword
    arguments) is needed only by structured granularities, to trace the model's channel groups.
    """

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, tasks: list[str], generator: torch.Generator,
                 example_inputs: Any = None):
        from .apply import MaskedModel
        from .masks import FLOAT_CACHES, MaskSet
        from .structures import GRANULARITIES, REDUCTIONS, StructureError, build_structures
        from .targets import select_targets
        from .update import MaskUpdater, check_schedule

        if len(tasks) < 1:
            raise ConfigError("tasks: at least one task is required")
        self.targets = select_targets(model, cfg.targets.include, cfg.targets.exclude)
        granularity = OmegaConf.select(cfg, "masking.granularity", default="element")
        reduce = OmegaConf.select(cfg, "masking.structure_reduce", default="mean")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"masking.granularity={granularity!r}: expected one of {list(GRANULARITIES)}")
        if reduce not in REDUCTIONS:
            raise ConfigError(f"masking.structure_reduce={reduce!r}: expected one of {list(REDUCTIONS)}")
        self.structures = None
        if granularity != "element":
            if example_inputs is None:
                raise ConfigError(f"masking.granularity={granularity}: this recipe passes no example inputs "
                                  f"to trace its model with; use masking.granularity=element")
            try:
                self.structures = build_structures(model, [t.name for t in self.targets], granularity,
                                                   example_inputs, reduce=reduce)
            except StructureError as e:
                raise ConfigError(f"masking.granularity={granularity}: {e}") from e
        self.initializer = build(cfg.initializer, "initializer")
        self.scorer = build(cfg.scorer, "scorer")
        self.scheduler = build(cfg.scheduler, "scheduler", total_steps=int(cfg.train.steps))
        self.grouper = build(cfg.grouper, "grouper")
        try:
            n_groups = self.grouper.n_groups(len(tasks))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.needs_grouping = n_groups < len(tasks)
        shapes = {t.name: t.shape for t in self.targets}
        if self.needs_grouping:
            init = {n: torch.ones((len(tasks), *s), dtype=torch.bool) for n, s in shapes.items()}
        else:
            init = (self.initializer.init_masks(shapes, len(tasks), generator) if self.structures is None
                    else self.structures.init_masks(self.initializer, len(tasks), generator))
        device = next(model.parameters()).device
        float_cache = OmegaConf.select(cfg, "masking.float_cache", default="all")
        if float_cache not in FLOAT_CACHES:
            raise ConfigError(f"masking.float_cache={float_cache!r}: expected one of {list(FLOAT_CACHES)} (all: a float "
                              f"copy of every group's masks; group: only the group in use)")
        self.masks = MaskSet({n: m.to(device) for n, m in init.items()}, tasks, float_cache=float_cache)
        if not self.needs_grouping:
            check_schedule(self.scheduler, self.masks, structures=self.structures)
        m = cfg.masking
        for key in ("update_every", "grad_batches"):
            if not isinstance(m[key], int) or m[key] < (0 if key == "update_every" else 1):
                raise ConfigError(f"masking.{key}={m[key]!r}: expected an integer >= {0 if key == 'update_every' else 1}")
        try:
            self.updater = MaskUpdater(self.scorer, self.scheduler, int(m.update_every), m.recovery_gradient,
                                       m.recovered_state, structures=self.structures,
                                       memory=OmegaConf.select(cfg, "masking.update_memory", default="full"))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if not self.needs_grouping:  # grouped masks are tracked from the grouping on (the recipe calls track)
            self.updater.track(self.masks)
        self.model = MaskedModel(model, self.masks)

    def group_density(self) -> float:
        """Overall density for group masks made from scores (the initializer's, 1.0 for dense)."""
        return float(getattr(self.initializer, "density", 1.0))
