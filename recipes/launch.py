"""Between the command line and a recipe: what is checked, and written, before a recipe runs.

``maskmtl run`` (``tools/run.py``) hands every job's composed config to :func:`launch`. In this
order, and before anything is written to the run folder (Hydra's own files included:
``conf/config.yaml`` sets ``hydra.output_subdir: null`` and this module writes ``.hydra/`` itself
once every check passed):

1. **overrides**: ``+key=value`` / ``++key=value`` adding a key that no config file declares is
   refused (nothing would read it); a group chosen for a recipe that has no use for it
   (``recipe=digits method=mtdt``) too;
2. **smoke**: under ``debug=smoke`` the recipe's smoke sizes (its ``smoke_overrides(cfg)``) are
   written into the config, except the keys given on the command line, which win; so the recorded
   config is the one that ran;
3. **values**: the shared keys by type and range (:func:`check_shared`), then the recipe's own
   ``check_config(cfg)`` when its module has one, so that a bad value fails in seconds, not after
   data generation or training;
4. **the run folder** (:func:`guard_run_dir`): a finished run (``results.json`` or
   ``data_summary.json``) is refused; a folder with a checkpoint resumes only under the config it
   was started with: any differing key is refused and listed, except those in ``resume_safe``;
5. **provenance**: ``.hydra/config.yaml`` (the resolved config), ``hydra.yaml`` and
   ``overrides.yaml`` are written atomically when a run starts; a resume leaves them and appends a
   line to ``.hydra/resumes.jsonl``; leftover temporary files of killed atomic writes are removed.

Then the recipe's ``run(cfg)``. ``dry_run=true`` runs steps 1-3 and the recipe's own dry run, and
writes nothing to the run folder.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from maskmtl.config import ConfigError, check_keys, is_bool, is_int
from maskmtl.masks import remove_stale_temps
from maskmtl.outputs import CHECKPOINT, RESULTS
from recipes.tools import config_dir
from recipes.common import RunDirError

CONF = config_dir()  # the root config folder: the checkout's conf/, or the installed copy
SUMMARY = "data_summary.json"  # recipe=make_data's finished-run file
FINISHED = (RESULTS, SUMMARY)
RUN_FILES = (RESULTS, SUMMARY, CHECKPOINT, "metrics.jsonl", "masks.safetensors")
HYDRA_DIR = ".hydra"
RECIPE_SPECIFIC_GROUPS = ("data", "method", "profile", "experiment")  # groups only some recipes read (cfg.recipe_groups)


# ----------------------------------------------------------------------------------- overrides

def _override_parts(text: str) -> tuple[str, str, str]:
    """``(prefix, key, value)`` of one command-line override (``+``, ``++``, ``~`` or '')."""
    prefix = ""
    for p in ("++", "+", "~"):
        if text.startswith(p):
            prefix, text = p, text[len(p):]
            break
    key, _, value = text.partition("=")
    return prefix, key.split("@", 1)[0], value


def overridden_keys(overrides: list[str]) -> set[str]:
    """The dotted keys set explicitly by command-line overrides (group choices excluded)."""
    return {key for _, key, _ in map(_override_parts, overrides) if not (CONF / key).is_dir()}


def check_overrides(cfg: DictConfig, overrides: list[str], choices: dict[str, Any]) -> None:
    """Refuse overrides that would be silently ignored: keys added with ``+`` / ``++`` that no
    config declares, and recipe-specific groups the chosen recipe does not read."""
    for text in overrides:
        prefix, key, _ = _override_parts(text)
        if prefix not in ("+", "++") or (CONF / key.split("/")[0]).is_dir() or key.startswith("hydra"):
            continue
        known = [k for k in _flat(OmegaConf.to_container(cfg, resolve=False)) if k != key]
        near = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"{text}: {key} is not a key of recipe={cfg.recipe_name}'s config, so nothing would "
                          f"read it{hint} (a key the config has is set as KEY=VALUE, without '+')")
    used = set(cfg.get("recipe_groups") or [])
    for group in sorted(RECIPE_SPECIFIC_GROUPS, key=lambda g: g != "experiment"):  # the one the user chose first
        if choices.get(group) is not None and group not in used:
            raise ConfigError(f"{group}={choices[group]}: recipe={cfg.recipe_name} has no use for the {group} group "
                              f"(it reads {sorted(used) or 'none of ' + str(list(RECIPE_SPECIFIC_GROUPS))})")


# ----------------------------------------------------------------------------------- smoke

def apply_smoke(cfg: DictConfig, overrides: list[str], module: Any) -> list[str]:
    """Write the recipe's ``smoke_overrides(cfg)`` into ``cfg`` (a ``debug=smoke`` run), leaving
    every key the command line set, and the keys below it. Returns the ``key=value`` applied."""
    if not cfg.get("smoke") or not hasattr(module, "smoke_overrides"):
        return []
    explicit = overridden_keys(overrides)
    applied = []
    for key, value in module.smoke_overrides(cfg).items():
        if any(key == e or key.startswith(e + ".") or e.startswith(key + ".") for e in explicit):
            continue
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        applied.append(f"{key}={value}")
    return applied


# ----------------------------------------------------------------------------------- values

SHARED_KEYS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", is_int(0, 2**32 - 1), "an integer in [0, 2^32)"),
    ("dry_run", is_bool, "true or false"),
    ("smoke", is_bool, "true or false"),
    ("device", lambda v: isinstance(v, str) and v != "", "auto, cpu, cuda or cuda:N"),
    ("data_root", lambda v: isinstance(v, str) and v != "", "a folder path"),
    ("masking.update_every", is_int(0), "an integer >= 0 (0: never)"),
    ("masking.grad_batches", is_int(1), "an integer >= 1"),
    ("grouping.warmup_steps", is_int(0), "an integer >= 0"),
    ("resume_safe", lambda v: all(isinstance(k, str) for k in v), "a list of dotted keys"),
]


def _masking_keys() -> list[tuple[str, Callable[[Any], bool], str]]:
    from maskmtl.gradients import RECOVERY_GRADIENTS
    from maskmtl.structures import GRANULARITIES, REDUCTIONS
    from maskmtl.update import RECOVERED_STATE

    return [(f"masking.{key}", (lambda opts: lambda v: v in opts)(opts), f"one of {list(opts)}")
            for key, opts in (("granularity", GRANULARITIES), ("structure_reduce", REDUCTIONS),
                              ("recovery_gradient", RECOVERY_GRADIENTS), ("recovered_state", RECOVERED_STATE))]


def check_shared(cfg: DictConfig) -> None:
    """The keys every recipe shares, by type and range, then the ones that depend on each other,
    and the four plug-in groups built once (a bad option value fails here, not in the recipe)."""
    from maskmtl.config import build, choose_device
    from recipes.common import check_gradient_config, resolve_threads, train_keys

    check_keys(cfg, SHARED_KEYS + train_keys() + _masking_keys())
    from recipes.loggers import check_logger

    check_logger(OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") is not None else None)
    resolve_threads(cfg.get("threads"))
    if "gradient" in cfg.train:  # recipes whose loop offers gradient surgery (harmodt)
        check_gradient_config(cfg)
    choose_device(cfg.device)
    steps, every = int(cfg.train.steps), int(cfg.masking.update_every)
    for group in ("initializer", "scorer", "grouper"):
        build(cfg[group], group)
    scheduler = build(cfg.scheduler, "scheduler", total_steps=steps)
    if every > steps and not cfg.dry_run and scheduler.max_alpha() > 0:
        raise ConfigError(f"masking.update_every={every} > train.steps={steps}: no mask update would run, yet "
                          f"scheduler={OmegaConf.select(cfg, 'scheduler._target_')} would swap entries; set "
                          f"masking.update_every <= train.steps, or 0 (never) with scheduler=frozen")


# ----------------------------------------------------------------------------------- run folder

def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def config_diff(old: dict, new: dict, safe: list[str]) -> list[str]:
    """``key: old -> new`` for every key that differs, keys in ``safe`` (or below them) left out."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in safe) or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def guard_run_dir(out: Path, resolved: dict) -> str:
    """``'fresh'`` or ``'resume'``; raises RunDirError for a folder that must not be touched.

    A folder holding run files (a checkpoint, metrics, masks) but no finished-run file is the same
    run resumed, or restarted after a kill before its first checkpoint: only under its config."""
    finished = [f for f in FINISHED if (out / f).exists()]
    if finished:
        raise RunDirError(f"{out} already holds a finished run ({finished[0]}); nothing was changed. Choose another "
                          f"hydra.run.dir (or delete that folder) to run again.")
    saved = out / HYDRA_DIR / "config.yaml"
    leftovers = [f for f in RUN_FILES if (out / f).exists()]
    if not leftovers:
        return "fresh"  # new, or only the .hydra/ of an attempt that failed before training wrote anything
    if not saved.exists():
        raise RunDirError(f"{out} holds {', '.join(leftovers)} but no {HYDRA_DIR}/config.yaml saying which config "
                          f"made them; nothing was changed. Choose another hydra.run.dir.")
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    except Exception as e:
        raise RunDirError(f"{saved} cannot be read ({e}); nothing was changed. Choose another hydra.run.dir.") from e
    safe = list(resolved.get("resume_safe") or []) + ["resume_safe"]
    diff = config_diff(old, resolved, safe)
    if diff:
        shown = "\n  ".join(diff[:20]) + (f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else "")
        raise RunDirError(f"{out} holds a run started with another config; resuming it would mix two runs. "
                          f"Differing keys (started -> now):\n  {shown}\nRun with the original values to resume, "
                          f"or choose another hydra.run.dir. Keys that may change on resume: {safe[:-1]} "
                          f"(resume_safe).")
    return "resume" if (out / CHECKPOINT).exists() else "fresh"


def record(out: Path, state: str, resolved: dict, hydra_cfg: DictConfig | None, overrides: list[str],
           smoke: list[str]) -> None:
    """Provenance files under ``.hydra/``: written at a run's start, a resume appended."""
    from maskmtl.masks import atomic_write_bytes

    hdir = out / HYDRA_DIR
    if state == "resume" or any((out / f).exists() for f in RUN_FILES):
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "state": state, "overrides": overrides}
        with open(hdir / "resumes.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return
    header = f"# resolved config of this run{' (debug=smoke set: ' + ', '.join(smoke) + ')' if smoke else ''}\n"
    atomic_write_bytes(hdir / "config.yaml", (header + OmegaConf.to_yaml(OmegaConf.create(resolved))).encode())
    if hydra_cfg is not None:
        atomic_write_bytes(hdir / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})).encode())
    atomic_write_bytes(hdir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))).encode())


# ----------------------------------------------------------------------------------- entry

def recipe_module(cfg: DictConfig):
    """The module of ``cfg.entry`` (a dotted function path set by the recipe) and the function."""
    from hydra.utils import get_method

    try:
        entry = get_method(cfg.entry)
    except Exception as e:
        raise ConfigError(f"entry={cfg.entry!r} (set by recipe={cfg.recipe_name}) cannot be imported: {e}") from e
    return sys.modules[entry.__module__], entry


def prepare(cfg: DictConfig, out: Path, overrides: list[str], choices: dict[str, Any],
            hydra_cfg: DictConfig | None = None) -> Callable[[DictConfig], Any]:
    """Steps 1-5 of the module docstring; returns the recipe's ``run``. Raises ConfigError or
    RunDirError with nothing written to ``out``."""
    module, entry = recipe_module(cfg)
    check_overrides(cfg, overrides, choices)
    smoke = apply_smoke(cfg, overrides, module)
    if smoke:
        print(f"debug=smoke: {' '.join(smoke)} (keys given on the command line kept)")
    check_shared(cfg)
    if hasattr(module, "check_config"):
        module.check_config(cfg)
    if cfg.dry_run:
        return entry
    resolved = OmegaConf.to_container(cfg, resolve=True)
    state = guard_run_dir(out, resolved)
    for p in remove_stale_temps(out):
        print(f"removed {p.name}, left by a write that was killed")
    record(out, state, resolved, hydra_cfg, overrides, smoke)
    return entry


def launch(cfg: DictConfig) -> Any:
    """The task function's body under Hydra (single run or one job of a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    choices = {k: v for k, v in dict(hc.runtime.choices).items() if not k.startswith("hydra")}
    try:
        entry = prepare(cfg, out, list(hc.overrides.task), choices, hydra_cfg=hc)
    except BaseException:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the empty folder Hydra made for this run: nothing of it stays
        raise
    return entry(cfg)
