"""Export a finished run's structured mask as a smaller dense model (``maskmtl export`` and
``python tools/export.py``, the same arguments).

    maskmtl export RUN_DIR task=NAME        # one task's mask
    maskmtl export RUN_DIR group=G          # one group's mask (grouped runs)
    maskmtl export RUN_DIR voting=THRESH    # the voting mask (> THRESH tasks; < 1: a fraction)
    options: out=DIR (default RUN_DIR/export/<task-NAME|group-G|voting-THRESH>), atol=1e-5, rtol=1e-5

The run must have been trained with ``masking.granularity=unit`` or ``head``. The model comes
from the run's ``checkpoint.pt`` (read with ``weights_only=True``), the masks from its
``masks.safetensors``, and the model is built by the recipe's ``export_setup(cfg, state)``.
Writes ``model.safetensors`` and ``export.json`` (see ``maskmtl.export``) and never replaces an
earlier export: OUT must not exist (or be an empty folder). Prints one JSON line: parameters
before and after, the largest output difference.

Errors are one line on stderr, and nothing is written: exit status 2 for an option that is wrong
(syntax, value, a task or group the run does not have), 1 for a run folder that cannot be exported
(missing or unreadable files, element masks, a recipe without ``export_setup``, an existing OUT,
outputs that differ by more than the tolerance).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

KEYS = ("task", "group", "voting", "out", "atol", "rtol")
PROG = "export"


class UsageError(Exception):
    """An option that is wrong (exit status 2)."""


class RunError(Exception):
    """A run folder that cannot be exported (exit status 1)."""


def parse_options(options: list[str]) -> dict[str, str]:
    """``key=value`` options -> dict, each key known and given at most once."""
    opts: dict[str, str] = {}
    for kv in options:
        key, eq, value = kv.partition("=")
        if not eq:
            raise UsageError(f"option {kv!r}: expected key=value with a key among {', '.join(KEYS)}")
        if key not in KEYS:
            raise UsageError(f"option {kv!r}: unknown key {key!r}; expected one of {', '.join(KEYS)}")
        if key in opts:
            raise UsageError(f"option {key} given twice ({key}={opts[key]} and {kv}); give it once")
        opts[key] = value
    for key in ("task", "out"):
        if key in opts and not opts[key].strip():
            raise UsageError(f"{key}=: expected a {'task name' if key == 'task' else 'folder'}, got an empty value")
    return opts


def which_mask(opts: dict[str, str]) -> str:
    which = [k for k in ("task", "group", "voting") if k in opts]
    if len(which) != 1:
        raise UsageError(f"give exactly one of task=NAME, group=G, voting=THRESH; got "
                         f"{', '.join(f'{k}={opts[k]}' for k in which) if which else 'none'}")
    return which[0]


def number(opts: dict[str, str], key: str, default: float, expected: str, ok) -> float:
    """``opts[key]`` as a finite float for which ``ok(value)``, else a UsageError naming the key."""
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{key}={raw!r}: expected {expected}") from None
    if not math.isfinite(value) or not ok(value):
        raise UsageError(f"{key}={raw!r}: expected {expected}")
    return value


def group_number(raw: str, n_groups: int | None = None) -> int:
    """``group=G`` as an integer >= 0 and, given the run's ``n_groups``, below it."""
    try:
        g = int(raw)
    except ValueError:
        g = -1
    if g < 0:
        raise UsageError(f"group={raw!r}: expected a group number, an integer >= 0")
    if n_groups is not None and g >= n_groups:
        raise UsageError(f"group={raw!r}: expected an integer in [0, {n_groups - 1}] "
                         f"(the run has {n_groups} group{'s' * (n_groups != 1)})")
    return g


def check_out(out: Path) -> None:
    """Never replace anything: OUT must not exist, or be an empty folder."""
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists() or out.is_symlink():
        kind = "folder that is not empty" if out.is_dir() else "file"
        raise RunError(f"out={out}: already exists (a {kind}); nothing was overwritten. Choose another out=DIR")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"out={out}: {parent} is a file, expected a folder")
            break


def read_run(run_dir: Path) -> tuple[dict, object]:
    """``results.json`` of a finished run and its config; RunError naming the file otherwise."""
    from omegaconf import OmegaConf

    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist (expected a finished run folder, with results.json, "
                       f"checkpoint.pt and masks.safetensors)")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a folder (expected a finished run folder)")
    path = run_dir / "results.json"
    if not path.is_file():
        raise RunError(f"{path} does not exist: the run has not finished (or {run_dir} is not a run folder); "
                       f"export needs a finished run")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); expected a run's results") from None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise RunError(f"{path}: expected a JSON object with the run's 'config' (written by the recipes)")
    cfg = OmegaConf.create(results["config"])
    entry = OmegaConf.select(cfg, "entry")
    if not isinstance(entry, str) or "." not in entry:
        raise RunError(f"{path}: config.entry is {entry!r}, expected the recipe's run function "
                       f"(e.g. recipes.digits.train.run)")
    for name in ("checkpoint.pt", "masks.safetensors"):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir / name} does not exist; export needs a finished run's {name}")
    return results, cfg


def load_state(path: Path) -> dict:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or a pickle weights_only refuses
        raise RunError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RunError(f"{path}: expected a checkpoint with the model's state dict under 'model'")
    return ckpt["model"]


def export_setup(cfg, path: Path):
    """The recipe module's ``export_setup``; RunError when it cannot be imported or has none."""
    module = cfg.entry.rsplit(".", 1)[0]
    try:
        recipe = importlib.import_module(module)
    except ImportError as e:
        raise RunError(f"{path}: the run's recipe module {module!r} (config.entry) cannot be imported: {e}") from None
    setup = getattr(recipe, "export_setup", None)
    if setup is None:
        raise RunError(f"{path}: recipe {module} has no export support (no export_setup(cfg, state)); "
                       f"export works for the recipes that define one (digits, harmodt)")
    return setup


def run_export(run_dir: Path, options: list[str]) -> dict:
    from omegaconf import OmegaConf

    from maskmtl import MaskSet, read_masks_file, select_targets
    from maskmtl.export import ExportError, export_pruned, save_export
    from maskmtl.masks import MaskError
    from maskmtl.structures import build_structures

    opts = parse_options(options)
    tol = "a number >= 0"
    atol = number(opts, "atol", 1e-5, tol, lambda v: v >= 0)
    rtol = number(opts, "rtol", 1e-5, tol, lambda v: v >= 0)
    thresh = number(opts, "voting", 0.0, "a number >= 0: a fraction of the tasks (< 1) or a count of tasks",
                    lambda v: v >= 0)
    if "group" in opts:
        group_number(opts["group"])  # an integer >= 0; the run's range is checked below
    key = which_mask(opts)
    out = Path(opts["out"]) if "out" in opts else run_dir / "export" / f"{key}-{opts[key]}"

    results, cfg = read_run(run_dir)
    granularity = OmegaConf.select(cfg, "masking.granularity", default="element")
    if granularity not in ("unit", "head"):
        raise RunError(f"{run_dir} was trained with masking.granularity={granularity}: element masks remove no "
                       f"whole unit or head; train with masking.granularity=unit or head to export")
    check_out(out)
    try:
        tensors, tasks, t2g = read_masks_file(run_dir / "masks.safetensors")
        masks = MaskSet(tensors, tasks, t2g)
    except MaskError as e:
        raise RunError(str(e)) from None
    if key == "task":
        if opts["task"] not in tasks:
            raise UsageError(f"task={opts['task']!r}: expected one of the run's tasks {tasks}")
        mask = masks.for_task(opts["task"])
    elif key == "group":
        mask = masks.group(group_number(opts["group"], masks.n_groups))
    else:
        if thresh >= 1 and thresh >= masks.n_tasks:
            raise UsageError(f"voting={opts['voting']!r}: expected a fraction in [0, 1) or a count of tasks below "
                             f"{masks.n_tasks} (the run has {masks.n_tasks} tasks; an entry is kept when more "
                             f"than THRESH tasks use it, so this keeps nothing)")
        mask = masks.voting_mask(thresh)

    state = load_state(run_dir / "checkpoint.pt")
    setup = export_setup(cfg, run_dir / "results.json")
    try:
        model, inputs, model_config = setup(cfg, state)
    except (RuntimeError, KeyError, ValueError) as e:  # load_state_dict: the checkpoint does not fit the config
        raise RunError(f"{run_dir / 'checkpoint.pt'} does not fit the model its results.json config builds: "
                       f"{str(e).splitlines()[0][:300]}") from None
    names = [t.name for t in select_targets(model, cfg.targets.include, cfg.targets.exclude)]
    missing = sorted(set(masks.names) - set(names))
    if missing:
        raise RunError(f"{run_dir / 'masks.safetensors'} masks {missing[:3]}, which the model's targets do not "
                       f"include: the masks are not this run's")
    smap = build_structures(model, names, granularity, inputs,
                            reduce=OmegaConf.select(cfg, "masking.structure_reduce", default="mean"))
    try:
        ex = export_pruned(model, mask, smap, inputs, atol=atol, rtol=rtol)
    except ExportError as e:
        raise RunError(f"{run_dir}: {e}") from None
    try:
        save_export(ex, out, model_config=model_config,
                    source={"run": str(run_dir), "recipe": results.get("recipe"), key: opts[key],
                            "granularity": granularity})
    except FileExistsError as e:  # created since check_out
        raise RunError(f"out={out}: {e}; nothing was overwritten") from None
    except OSError as e:
        raise RunError(f"out={out}: cannot write the export ({e})") from None
    return {"export": str(out), "params_full": ex.params_full, "params_exported": ex.params_pruned,
            "params_ratio": ex.params_pruned / ex.params_full, "max_abs_diff": ex.max_abs_diff,
            "removed_units": {k: len(v) for k, v in ex.plan["units"].items()},
            "removed_heads": {k: len(v) for k, v in ex.plan["heads"].items()}}


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status. ``prog``
    names the command in the usage and error lines."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("options", nargs="+", help="task=NAME | group=G | voting=THRESH, and out=DIR, atol=X, rtol=X")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse printed its usage error (status 2) or the help (0)
        return int(e.code or 0)
    try:
        summary = run_export(args.run_dir, args.options)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
