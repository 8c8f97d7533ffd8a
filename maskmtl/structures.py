"""Structured (prunable) masks: the decision unit is a whole output unit, channel or attention head.

A structured mask is still an element mask ``[G, *P]`` per target (so ``MaskedModel`` and
``MaskedAdamW`` are unchanged), only constant over each structure's entries. A ``StructureMap``
says which structure every target entry belongs to: per target an int64 tensor of the parameter's
shape holding a structure id in ``0..S-1``, or ``-1`` for an entry in no structure. Entries in no
structure are active in every group and never swapped (they are shared, like a non-target).

Everything the element path does has a structure twin here, built on the same functions:

* scores: a scorer's element scores ``[G, *P]`` are aggregated per structure (``sum`` or ``mean``
  over its entries) into ``[G, S]``;
* swap and ``masks_from_scores``: ``maskmtl.selection.swap`` / ``masks_from_scores`` run on the
  ``[G, S]`` structure masks (one flat "target" of S entries), so their invariants (exact counts,
  disjointness, density unchanged) hold per structure, then the result is expanded to entries;
* initialisation: the initializer's densities over *structure families* (all units of one layer,
  all heads of one attention module), exact counts of structures per family and group;
* the schedule: α_t counts entries at every granularity; here it becomes ⌈α_t / s̄⌉ structures,
  s̄ the mean number of target entries per structure, so one scheduler config changes about the
  same share of the network at every granularity.

Where structures come from:

* ``unit``: torch-pruning's ``DependencyGraph`` traces the model on example inputs; every group
  of coupled channels rooted at a Linear/Conv output gives one structure per channel, made of
  every target slice in the group: the producer's rows (an Embedding's columns) (and bias when it is a target) and the
  consumer's input columns. A group is used only when removing its channels is exactly the same
  as zeroing their slices: it must have a consumer (the model's output layer has none), every
  consumer slice must be in a target (so the masked model zeroes the channel's contribution; the
  producer's bias then needs no mask: whatever the unit outputs is multiplied by zero), it may
  pass only through Linear, Conv (groups=1), Embedding, BatchNorm and element-wise/reshape ops
  (a LayerNorm mixes channels: the residual stream of a transformer is never a structure), no
  parameter in it may be tied to another module, and none of its entries may already belong to
  an earlier structure. One entry can belong to one structure only, so in a chain of layers
  fc1 → fc2 → fc3 the units of fc1 (rows of fc1, columns of fc2) and of fc2 (rows of fc2,
  columns of fc3) overlap in fc2; families are taken in module order and the later one is
  skipped (every other layer of a plain MLP is structured, starting with the first). ``StructureMap.report`` lists every family kept or skipped, with the reason.
* ``head``: attention heads from the model's ``attention_heads()`` method (a list of
  ``AttentionHeads``: which Linear modules produce the per-head q/k/v features and which one
  merges the heads), plus the ``unit`` structures of everything else. A head's structure is its
  rows in the projecting Linears (weight and bias where targets) and its columns in the merging
  Linear, which must be a target. Modules named in ``attention_heads()`` are never unit
  structures (their channels are not independent: q and k channels meet in q·kᵀ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .selection import SwapResult, masks_from_scores, swap

GRANULARITIES = ("element", "unit", "head")
REDUCTIONS = ("mean", "sum")
# modules whose output channels root a unit family
ROOT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class StructureError(ValueError):
    """Structures that cannot be built for this model (untraceable, none found, bad declaration)."""


@dataclass(frozen=True)
class AttentionHeads:
    """One multi-head attention, declared by the model (``model.attention_heads()``).

    Args:
        module: the attention module's name; its attribute ``count_attr`` holds the head count.
        n_head, head_dim: heads and features per head.
        split: ``(Linear name, chunks)`` pairs: Linears whose output features are ``chunks``
            blocks of ``n_head × head_dim`` (a fused qkv projection is ``("qkv", 3)``; separate
            q, k, v projections are three pairs with chunks 1).
        merge: Linears whose input features are ``n_head × head_dim`` (the output projection).
        count_attr: the attribute that export lowers when heads are removed.
    """

    module: str
    n_head: int
    head_dim: int
    split: tuple[tuple[str, int], ...]
    merge: tuple[str, ...]
    count_attr: str = "n_head"


@dataclass
class Family:
    """All structures of one layer: the units of one Linear/Conv, or the heads of one attention."""

    kind: str  # "unit" | "head"
    root: str  # unit: the producing module; head: the attention module
    first: int  # structure ids first .. first + count - 1
    count: int
    size: int  # target entries per structure
    heads: AttentionHeads | None = None


@dataclass
class StructureMap:
    """Structure id of every target entry (``-1``: in no structure) and the structure families.

    Attributes:
        ids: target name -> int64 tensor of the parameter's shape.
        families: in id order.
        reduce: how element scores are aggregated per structure, ``sum`` or ``mean``.
        granularity: ``unit`` or ``head``.
        report: one line per candidate family, kept or skipped and why.
    """

    ids: dict[str, torch.Tensor]
    families: list[Family]
    reduce: str = "mean"
    granularity: str = "unit"
    report: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise StructureError(f"masking.structure_reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        n = self.n_structures
        sizes = torch.zeros(n, dtype=torch.int64)
        for t in self.ids.values():
            v = t[t >= 0]
            if v.numel() and (int(v.max()) >= n):
                raise StructureError(f"structure ids reach {int(v.max())} but there are {n} structures")
            sizes += torch.bincount(v.reshape(-1), minlength=n)
        if n and int(sizes.min()) == 0:
            raise StructureError("a structure has no target entries")
        self.sizes = sizes

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def n_structures(self) -> int:
        return sum(f.count for f in self.families)

    def structured_numel(self) -> int:
        """Target entries that belong to some structure."""
        return int(self.sizes.sum())

    def alpha(self, alpha_entries: int) -> int:
        """α_t in entries -> structures swapped: ⌈α_t / s̄⌉ (0 stays 0)."""
        if alpha_entries <= 0:
            return 0
        mean_size = self.structured_numel() / self.n_structures
        return int(math.ceil(alpha_entries / mean_size))

    # ---- entries <-> structures ------------------------------------------------------------
    def aggregate(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Element scores name -> ``[G, *P]`` to structure scores ``[G, S]`` (float64), by
        ``self.reduce`` over each structure's entries."""
        out = None
        for n, ids in self.ids.items():
            s = scores[n]
            g = s.shape[0]
            if out is None:
                out = torch.zeros((g, self.n_structures), dtype=torch.float64, device=s.device)
            flat_ids = ids.to(s.device).reshape(-1)
            keep = flat_ids >= 0
            out.index_add_(1, flat_ids[keep], s.reshape(g, -1)[:, keep].double())
        if self.reduce == "mean":
            out = out / self.sizes.to(out.device, torch.float64)
        return out

    def to_structures(self, masks: Mapping[str, torch.Tensor], check: bool = True) -> torch.Tensor:
        """Element masks ``[G, *P]`` -> structure masks ``[G, S]`` bool. ``check`` raises unless
        every structure's entries agree and every entry in no structure is active."""
        out = None
        for n, ids in self.ids.items():
            m = masks[n]
            g = m.shape[0]
            flat_ids = ids.to(m.device).reshape(-1)
            keep = flat_ids >= 0
            on = torch.zeros((g, self.n_structures), dtype=torch.int64, device=m.device)
            on.index_add_(1, flat_ids[keep], m.reshape(g, -1)[:, keep].long())
            out = on if out is None else out + on
            if check and not bool(m.reshape(g, -1)[:, ~keep].all()):
                raise StructureError(f"mask {n!r} turns off entries that belong to no structure")
        sizes = self.sizes.to(out.device)
        if check and not bool(((out == 0) | (out == sizes)).all()):
            bad = int(((out != 0) & (out != sizes)).any(dim=0).nonzero()[0])
            raise StructureError(f"masks are not constant over structure {bad} ({self.describe(bad)})")
        return out == sizes

    def to_elements(self, smasks: torch.Tensor, fill: bool = True) -> dict[str, torch.Tensor]:
        """Structure masks ``[G, S]`` -> element masks name -> ``[G, *P]``; entries in no
        structure get ``fill`` (True for masks, False for dropped/recovered sets)."""
        out = {}
        g = smasks.shape[0]
        for n, ids in self.ids.items():
            flat_ids = ids.to(smasks.device).reshape(-1)
            keep = flat_ids >= 0
            m = torch.full((g, flat_ids.numel()), fill, dtype=torch.bool, device=smasks.device)
            m[:, keep] = smasks[:, flat_ids[keep]]
            out[n] = m.reshape(g, *ids.shape)
        return out

    def describe(self, sid: int) -> str:
        for f in self.families:
            if f.first <= sid < f.first + f.count:
                return f"{f.kind} {sid - f.first} of {f.root}"
        raise IndexError(f"structure id sid={sid!r} is out of range: ids are 0..{self.n_structures - 1}")

    # ---- the structure twins of swap, masks_from_scores and initialisation -----------------
    def _unused(self, unused: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        # a structure is unused when all of its entries are
        return None if unused is None else {"structures": self.to_structures(unused, check=False)}

    def swap(self, masks: Mapping[str, torch.Tensor], drop_scores: Mapping[str, torch.Tensor],
             grow_scores: Mapping[str, torch.Tensor], alpha: int, unused: Mapping[str, torch.Tensor] | None = None):
        """``maskmtl.selection.swap`` over structures: drop the ``alpha`` active structures of
        lowest aggregated drop score and recover the ``alpha`` inactive ones of highest aggregated
        grow score, per group. ``alpha`` counts structures. Returns a ``SwapResult`` in entries.
        ``unused`` (entries no task of the group uses): structures all of whose entries are
        unused are dropped first and recovered last."""
        sm = self.to_structures(masks)
        res = swap({"structures": sm}, {"structures": self.aggregate(drop_scores)},
                   {"structures": self.aggregate(grow_scores)}, alpha, unused=self._unused(unused))
        return SwapResult(self.to_elements(res.masks["structures"]),
                          self.to_elements(res.dropped["structures"], fill=False),
                          self.to_elements(res.recovered["structures"], fill=False), res.alpha)

    def masks_from_scores(self, scores: Mapping[str, torch.Tensor], density: float,
                          unused: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per group, keep the ``round(density · S)`` structures of highest aggregated score
        (structures all of whose entries are ``unused`` last)."""
        kept = masks_from_scores({"structures": self.aggregate(scores)}, density,
                                 unused=self._unused(unused))["structures"]
        return self.to_elements(kept)

    def family_densities(self, initializer: Any) -> dict[str, float]:
        """The initializer's density per family (key ``kind:root``), counting structures.

        ERK sees each family as a matrix (structures × entries per structure) holding its
        entries; random and dense give every family the same density."""
        keys = {f"{f.kind}:{f.root}": f for f in self.families}
        shapes = {k: (f.count, f.size) for k, f in keys.items()}
        return initializer.densities(shapes)

    def init_masks(self, initializer: Any, n_groups: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Initial element masks: per family and group exactly ``round(d · count)`` structures on,
        drawn from ``generator``."""
        from .initializers import draw_masks

        dens = self.family_densities(initializer)
        shapes = {f"{f.kind}:{f.root}": (f.count,) for f in self.families}
        drawn = draw_masks(dens, shapes, n_groups, generator)
        sm = torch.cat([drawn[k] for k in shapes], dim=1)  # [G, S] in id order
        return self.to_elements(sm)

    def counts(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Active structures per group, ``[G]``."""
        return self.to_structures(masks).sum(dim=1)


def print_structure_report(smap: StructureMap, console=None) -> None:
    """Print the candidate families (kept with their sizes, or skipped with the reason) and totals."""
    from rich.console import Console

    console = console or Console()
    console.print(f"[b]structures[/b] (masking.granularity={smap.granularity}, structure_reduce={smap.reduce})")
    for line in smap.report:
        console.print(f"  {line}", markup=False)
    console.print(f"  total: {smap.n_structures} structures over {smap.structured_numel():,} target entries; "
                  f"other target entries stay active in every group", markup=False)


# ---- building the map -------------------------------------------------------------------

def _tied_params(model: nn.Module) -> set[int]:
    owners: dict[int, set[str]] = {}
    for mname, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mname)
    return {pid for pid, mods in owners.items() if len(mods) > 1}


def _slices(mod: nn.Module, mname: str, out: bool) -> list[tuple[str, int]] | None:
    """(parameter name, dim) pairs an output (``out``) or input channel of ``mod`` indexes; None
    for a module a unit structure may not pass through."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if isinstance(mod, nn.Linear) or (isinstance(mod, conv) and mod.groups == 1):
        if out:
            return [(f"{mname}.weight", 0)] + ([(f"{mname}.bias", 0)] if mod.bias is not None else [])
        return [(f"{mname}.weight", 1)]
    if isinstance(mod, nn.Embedding):
        return [(f"{mname}.weight", 1)]
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return [(f"{mname}.{p}", 0) for p in ("weight", "bias") if getattr(mod, p) is not None]
    return None


def _index(dim: int, idx: torch.Tensor) -> tuple:
    """The indexing tuple that takes ``idx`` along ``dim``."""
    return tuple([slice(None)] * dim + [idx])


def build_structures(model: nn.Module, target_names: Sequence[str], granularity: str, example_inputs: Any,
                     reduce: str = "mean") -> StructureMap:
    """Structure map of ``model``'s targets for ``granularity`` ``unit`` or ``head``.

    Args:
        model: the (unmasked) model.
        target_names: the mask targets.
        granularity: ``unit`` (channel groups from torch-pruning) or ``head`` (declared
            attention heads, plus units elsewhere).
        example_inputs: inputs torch-pruning traces the model with: a tensor, a tuple of
            positional inputs, or a dict of keyword inputs.
        reduce: ``sum`` or ``mean`` aggregation of element scores.
    Raises:
        StructureError: unknown granularity, no declared heads for ``head``, a model
            torch-pruning cannot trace, or no structure at all among the targets.
    """
    if granularity not in ("unit", "head"):
        raise StructureError(f"masking.granularity must be one of {GRANULARITIES}, got {granularity!r}")
    params = dict(model.named_parameters())
    ids = {n: torch.full(tuple(params[n].shape), -1, dtype=torch.int64) for n in target_names}
    families: list[Family] = []
    report: list[str] = []
    declared = list(model.attention_heads()) if hasattr(model, "attention_heads") else []
    if granularity == "head" and not declared:
        raise StructureError(f"masking.granularity=head: {type(model).__name__} declares no attention heads "
                             f"(an attention_heads() method returning AttentionHeads); use unit or element")
    head_modules = {n for h in declared for n in [*(s for s, _ in h.split), *h.merge]}
    next_id = 0
    if granularity == "head":
        for h in declared:
            next_id = _add_heads(h, model, ids, families, report, next_id)
    next_id = _add_units(model, ids, families, report, next_id, example_inputs, head_modules)
    if not families:
        raise StructureError(f"masking.granularity={granularity}: no structure among the targets "
                             f"{list(target_names)[:6]}...; candidates: " + "; ".join(report or ["none"]))
    return StructureMap(ids, families, reduce=reduce, granularity=granularity, report=report)


def _add_heads(h: AttentionHeads, model: nn.Module, ids: dict, families: list, report: list, first: int) -> int:
    mods = dict(model.named_modules())
    width = h.n_head * h.head_dim
    claims = []  # (param, dim, index tensor, head of each index)
    for name, chunks in h.split:
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear) or lin.out_features != chunks * width:
            raise StructureError(f"attention_heads(): {name!r} must be a Linear with {chunks}×{h.n_head}×"
                                 f"{h.head_dim} output features, got {lin}")
        idx = torch.arange(chunks * width)
        head = (idx % width) // h.head_dim
        for p in ("weight", "bias"):
            if f"{name}.{p}" in ids:
                claims.append((f"{name}.{p}", 0, idx, head))
    for name in h.merge:
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear) or lin.in_features != width:
            raise StructureError(f"attention_heads(): {name!r} must be a Linear with {width} input features, got {lin}")
        if f"{name}.weight" not in ids:
            report.append(f"heads of {h.module}: skipped, {name}.weight (merging the heads) is not a mask target")
            return first
        idx = torch.arange(width)
        claims.append((f"{name}.weight", 1, idx, idx // h.head_dim))
    if not _free(ids, claims):
        report.append(f"heads of {h.module}: skipped, its entries already belong to other structures")
        return first
    _claim(ids, claims, first)
    size = sum(ids[p][_index(d, i)].numel() for p, d, i, _ in claims) // h.n_head
    families.append(Family("head", h.module, first, h.n_head, size, heads=h))
    report.append(f"heads of {h.module}: {h.n_head} structures of {size} entries")
    return first + h.n_head


def _free(ids: dict, claims) -> bool:
    return all(bool((ids[p][_index(d, i)] < 0).all()) for p, d, i, _ in claims)


def _claim(ids: dict, claims, first: int) -> None:
    for p, d, idx, which in claims:
        t = ids[p]
        shape = [1] * t.dim()
        shape[d] = -1
        sel = _index(d, idx)
        t[sel] = (first + which).reshape(shape).expand_as(t[sel])


def _add_units(model: nn.Module, ids: dict, families: list, report: list, first: int, example_inputs: Any,
               head_modules: set[str]) -> int:
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - the dependency is declared
        raise StructureError("masking.granularity=unit|head needs torch-pruning (pip install torch-pruning)") from e
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # torch-pruning traces through autograd
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        groups = dg.get_all_groups(root_module_types=ROOT_TYPES)
    except Exception as e:  # torch-pruning raises assorted errors on graphs it cannot follow
        raise StructureError(f"torch-pruning could not trace {type(model).__name__} on the example inputs: "
                             f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(names)}
    tied = _tied_params(model)
    # in module order, so the earlier of two overlapping families is the one kept
    for group in sorted(groups, key=lambda g: order.get(g[0].dep.target.module, len(order))):
        root = group[0].dep.target.module
        rname = names.get(root, "?")
        claims, why, consumer = [], None, False
        for item in group:
            mod = item.dep.target.module
            if mod not in names:  # torch-pruning's element-wise / reshape / concat nodes
                continue
            mname = names[mod]
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            sl = _slices(mod, mname, out)
            if sl is None:
                why = f"passes through {type(mod).__name__} {mname!r}, which mixes or is not a plain channel"
                break
            if mname in head_modules:
                why = f"touches {mname!r}, declared as attention heads"
                break
            if any(id(p) in tied for p in mod.parameters(recurse=False)):
                why = f"{mname!r} has a parameter tied to another module"
                break
            # a consumer reads the channels as inputs (an Embedding or BatchNorm only carries them)
            is_consumer = not out and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            consumer = consumer or is_consumer
            idx = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.int64)
            root_idx = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.int64)
            for pname, dim in sl:
                if pname in ids:
                    claims.append((pname, dim, idx, root_idx))
                elif is_consumer:
                    why = f"consumer {pname} is not a mask target (masking could not zero the unit's output)"
                    break
            if why:
                break
        if why is None and not consumer:
            why = "no layer consumes these channels (a model output)"
        if why is None and not claims:
            why = "no slice in a mask target"
        if why is None and not _free(ids, claims):
            why = "overlaps structures already taken (consecutive layers: one entry, one structure)"
        if why is not None:
            report.append(f"units of {rname}: skipped, {why}")
            continue
        count = int(max(int(r.max()) for _, _, _, r in claims)) + 1
        # root_idxs are the root's channel numbers: one structure per channel
        _claim(ids, claims, first)
        entries = sum(int((ids[p] >= first).logical_and(ids[p] < first + count).sum()) for p in {c[0] for c in claims})
        families.append(Family("unit", rname, first, count, entries // count))
        report.append(f"units of {rname}: {count} structures of {entries // count} entries")
        first += count
    return first
