#!/usr/bin/env python
"""Export a finished run's structured mask as a smaller dense model.

    python tools/export.py RUN_DIR task=NAME        # one task's mask
    python tools/export.py RUN_DIR group=G          # one group's mask (grouped runs)
    python tools/export.py RUN_DIR voting=THRESH    # the voting mask (> THRESH tasks; < 1: a fraction)
    options: out=DIR (default RUN_DIR/export/<task-NAME|group-G|voting-THRESH>), atol=1e-5, rtol=1e-5

The run must have been trained with ``masking.granularity=unit`` or ``head``. The model comes
from the run's ``checkpoint.pt`` (read with ``weights_only=True``), the masks from its
``masks.safetensors``, and the model is built by the recipe's ``export_setup(cfg, state)``.
Writes ``model.safetensors`` and ``export.json`` (see ``maskmtl.export``) and never replaces an
earlier export. Prints one JSON line: parameters before and after, the largest output difference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import torch
    from omegaconf import OmegaConf

    from maskmtl import MaskSet, read_masks_file, select_targets
    from maskmtl.config import ConfigError
    from maskmtl.export import export_pruned, save_export
    from maskmtl.structures import build_structures

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("options", nargs="+", help="task=NAME | group=G | voting=THRESH, and out=DIR, atol=X, rtol=X")
    args = p.parse_args(argv)
    opts = dict(kv.split("=", 1) for kv in args.options if "=" in kv)
    if len(opts) != len(args.options) or set(opts) - {"task", "group", "voting", "out", "atol", "rtol"}:
        p.error(f"options must be key=value with keys task, group, voting, out, atol, rtol; got {args.options}")
    which = [k for k in ("task", "group", "voting") if k in opts]
    if len(which) != 1:
        p.error("give exactly one of task=NAME, group=G, voting=THRESH")
    results = json.loads((args.run_dir / "results.json").read_text())
    cfg = OmegaConf.create(results["config"])
    granularity = OmegaConf.select(cfg, "masking.granularity", default="element")
    if granularity == "element":
        raise ConfigError(f"{args.run_dir} was trained with masking.granularity=element: element masks remove no "
                          f"whole unit or head; train with masking.granularity=unit or head to export")
    state = torch.load(args.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    recipe = importlib.import_module(cfg.entry.rsplit(".", 1)[0])
    model, inputs, model_config = recipe.export_setup(cfg, state)
    tensors, tasks, t2g = read_masks_file(args.run_dir / "masks.safetensors")
    masks = MaskSet(tensors, tasks, t2g)
    key = which[0]
    if key == "task":
        if opts["task"] not in tasks:
            p.error(f"task={opts['task']!r} is not one of the run's tasks {tasks}")
        mask = masks.for_task(opts["task"])
    elif key == "group":
        mask = masks.group(int(opts["group"]))
    else:
        mask = masks.voting_mask(float(opts["voting"]))
    names = [t.name for t in select_targets(model, cfg.targets.include, cfg.targets.exclude)]
    smap = build_structures(model, names, granularity, inputs,
                            reduce=OmegaConf.select(cfg, "masking.structure_reduce", default="mean"))
    ex = export_pruned(model, mask, smap, inputs, atol=float(opts.get("atol", 1e-5)), rtol=float(opts.get("rtol", 1e-5)))
    out = Path(opts.get("out", args.run_dir / "export" / f"{key}-{opts[key]}"))
    save_export(ex, out, model_config=model_config,
                source={"run": str(args.run_dir), "recipe": results["recipe"], key: opts[key],
                        "granularity": granularity})
    print(json.dumps({"export": str(out), "params_full": ex.params_full, "params_exported": ex.params_pruned,
                      "params_ratio": ex.params_pruned / ex.params_full, "max_abs_diff": ex.max_abs_diff,
                      "removed_units": {k: len(v) for k, v in ex.plan["units"].items()},
                      "removed_heads": {k: len(v) for k, v in ex.plan["heads"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
