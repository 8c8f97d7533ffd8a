"""Export one task's (or group's, or the voting) structured mask as a physically smaller dense model.

With structured masks (``masking.granularity=unit|head``) a mask removes whole output units,
channels and attention heads. ``export_pruned`` copies the model, multiplies every target by the
mask (θ ⊙ M, what the masked model computes with), then removes the masked-out structures:

* unit families through torch-pruning's dependency graph: ``get_pruning_group`` on the family's
  root module with the removed channels prunes every coupled slice (the producer's rows and bias,
  the consumers' columns, the slices behind a flatten);
* attention heads through torch-pruning's Linear pruning functions on the declared projections
  (rows of each q/k/v block, columns of the merging projection), and the attention module's head
  count attribute is lowered.

Removing a structure is exactly zeroing it: its consumer slices are masked in the masked model
(see ``maskmtl.structures``), so a removed unit's bias, whatever it is, reaches nothing. The
export checks this on the example inputs and refuses (``ExportError``) when the two outputs
differ by more than ``atol + rtol · max|output|``.

Saved form (``save_export``), no pickle: ``model.safetensors`` holds the pruned model's state
dict; ``export.json`` holds the removal plan (which channels of which module, which heads of which
attention), the pruned shapes, the caller's ``model_config`` (what is needed to build the full
model again) and where the mask came from. ``load_export`` builds the pruned model from a freshly
built full model: it applies the plan, checks every shape against the JSON, then loads the weights.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .masks import atomic_write_bytes
from .structures import AttentionHeads, StructureMap

FORMAT = "maskmtl.export/1"
WEIGHTS, META = "model.safetensors", "export.json"


class ExportError(ValueError):
    """A mask that cannot be exported, or an exported model that does not match the masked one."""


@dataclass
class Exported:
    model: nn.Module  # the pruned dense model (eval mode)
    plan: dict  # {"units": {root: [channels]}, "heads": {attention: [heads]}, "head_specs": {...}}
    max_abs_diff: float  # masked full model vs pruned model on the example inputs
    params_full: int
    params_pruned: int


def call(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` the way torch-pruning does: dict -> keywords, tuple/list -> positional."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(fa, fb)),
               default=0.0)


def removal_plan(structures: StructureMap, mask: Mapping[str, torch.Tensor]) -> dict:
    """Which structures a mask (target name -> bool, the parameter's shape) removes."""
    on = structures.to_structures({n: m[None] for n, m in mask.items()})[0].cpu()  # [S]
    plan: dict = {"units": {}, "heads": {}, "head_specs": {}}
    for f in structures.families:
        off = (~on[f.first:f.first + f.count]).nonzero().flatten().tolist()
        if not off:
            continue
        if f.kind == "unit":
            plan["units"][f.root] = off
        else:
            plan["heads"][f.root] = off
            spec = asdict(f.heads)
            spec["split"] = [list(s) for s in spec["split"]]
            spec["merge"] = list(spec["merge"])
            plan["head_specs"][f.root] = spec
    return plan


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Mapping, example_inputs: Any) -> nn.Module:
    """Remove the plan's structures from ``model`` in place (and return it)."""
    import torch_pruning as tp

    mods = dict(model.named_modules())
    was_training = model.training
    model.eval()
    if plan["units"]:
        with torch.enable_grad():  # torch-pruning traces through autograd
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        # Families never share a (module, dimension) pair, so pruning one leaves the others'
        # channel numbers valid; each group is taken just before it is pruned.
        for root, idxs in plan["units"].items():
            mod = mods[root]
            group = dg.get_pruning_group(mod, dg.get_pruner_of_module(mod).prune_out_channels, list(idxs))
            group.prune()
    for name, removed in plan["heads"].items():
        spec = plan["head_specs"][name]
        h = AttentionHeads(spec["module"], spec["n_head"], spec["head_dim"],
                           tuple((s, int(c)) for s, c in spec["split"]), tuple(spec["merge"]), spec["count_attr"])
        width, hd = h.n_head * h.head_dim, h.head_dim
        cols = [r * hd + j for r in removed for j in range(hd)]
        for lin, chunks in h.split:
            tp.prune_linear_out_channels(mods[lin], [c * width + x for c in range(chunks) for x in cols])
        for lin in h.merge:
            tp.prune_linear_in_channels(mods[lin], cols)
        setattr(mods[h.module], h.count_attr, h.n_head - len(removed))
    model.train(was_training)
    return model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def export_pruned(model: nn.Module, mask: Mapping[str, torch.Tensor], structures: StructureMap, example_inputs: Any,
                  atol: float = 1e-5, rtol: float = 1e-5) -> Exported:
    """A pruned copy of ``model`` for one mask.

    Args:
        model: the full model (not changed).
        mask: target name -> bool tensor of the parameter's shape (one group's row, a task's
            mask, or a voting mask); constant over every structure.
        structures: the ``StructureMap`` the masks were trained with.
        example_inputs: inputs to trace with and to compare outputs on (eval mode).
        atol, rtol: the outputs may differ by at most ``atol + rtol · max|masked output|``
            (summation order changes when entries are removed).
    Raises:
        ExportError: the mask is not constant over structures, or the outputs differ.
    """
    try:
        plan = removal_plan(structures, mask)
    except ValueError as e:
        raise ExportError(f"this mask cannot be exported: {e}") from e
    full = copy.deepcopy(model).eval()
    params = dict(full.named_parameters())
    for n, m in mask.items():  # θ ⊙ M: what the masked model computes with
        params[n].mul_(m.to(params[n].device, params[n].dtype))
    reference = call(full, example_inputs)
    scale = max((float(t.abs().max()) for t in _flatten(reference) if t.numel()), default=0.0)
    n_full = _n_params(full)
    pruned = apply_plan(full, plan, example_inputs).eval()
    diff = max_abs_diff(reference, call(pruned, example_inputs))
    if not diff <= atol + rtol * scale:
        raise ExportError(f"the pruned model's outputs differ from the masked model's by {diff:.3g} (> atol {atol} + "
                          f"rtol {rtol} × {scale:.3g}); a structure's removal is not equivalent to its mask in this model")
    return Exported(pruned, plan, diff, n_full, _n_params(pruned))


def save_export(exported: Exported, out_dir: str | os.PathLike, *, model_config: Mapping[str, Any],
                source: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``export.json`` into ``out_dir`` (never over an earlier
    export: FileExistsError). Returns the folder."""
    from safetensors.torch import save

    out = Path(out_dir)
    if (out / META).exists() or (out / WEIGHTS).exists():
        raise FileExistsError(f"{out} already holds an export; choose another folder")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in exported.model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, save(state, metadata={"format": FORMAT}), replace=False)
    meta = {
        "format": FORMAT,
        "plan": exported.plan,
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "model_config": dict(model_config),
        "source": dict(source),
        "params_full": exported.params_full,
        "params_pruned": exported.params_pruned,
        "max_abs_diff": exported.max_abs_diff,
    }
    atomic_write_bytes(out / META, (json.dumps(meta, indent=1) + "\n").encode(), replace=False)
    return out


def read_export_meta(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_export(full_model: nn.Module, out_dir: str | os.PathLike, example_inputs: Any) -> nn.Module:
    """Rebuild an exported model: ``full_model`` (freshly built from ``model_config``, any
    weights) is pruned by the saved plan, checked against the saved shapes, and loaded."""
    from safetensors.torch import load_file

    meta = read_export_meta(out_dir)
    model = apply_plan(full_model, meta["plan"], example_inputs)
    state = load_file(str(Path(out_dir) / WEIGHTS))
    have = {k: list(v.shape) for k, v in model.state_dict().items()}
    if have != meta["shapes"]:
        diff = sorted(k for k in set(have) | set(meta["shapes"]) if have.get(k) != meta["shapes"].get(k))
        raise ExportError(f"{out_dir}: the rebuilt model's shapes differ from the export's at {diff[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval()
