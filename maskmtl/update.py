"""The mask update (spec §3, Algorithms 2 and 5): estimate gradients, score (scorer), take α_t
(scheduler), swap (``maskmtl.selection``, the only code that changes masks and checks its own
invariants), fix optimizer state; also the checks before training (``check_schedule``), G-HarmoDT's
grouping (``group_tasks``) and the update's diagnostics (``swap_diagnostics``).

``swap``, ``masks_from_scores``, ``SwapResult`` and ``MaskUpdateError`` live in
``maskmtl.selection`` and are importable from here too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .gradients import (RECOVERY_GRADIENTS, Batches, GroupGradients, LossFn, TaskGradients, estimate_gradients,
                        group_order_sum, harmony, harmony_terms, unused_by_group)
from .interfaces import Scheduler, Scorer, StepAwareScorer, TermScorer
from .masks import MaskSet
from .selection import MaskUpdateError, SwapResult, masks_from_scores, swap  # noqa: F401  (re-exported)
from .structures import StructureMap

RECOVERED_STATE = ("reset_dormant", "keep")
UPDATE_MEMORY = ("full", "grouped")


def check_schedule(scheduler: Scheduler, masks: MaskSet, key: str = "scheduler",
                   structures: StructureMap | None = None) -> None:
    """Fail before training if the schedule would ever ask for more swaps than a group can make.
    With a structure map, α and the counts are in structures (``StructureMap.alpha``).

    A schedule in shares of the active entries (``scheduler.unit=share``) is converted to counts
    here, the one place where the masks and the schedule meet before any update (see
    ``convert_share``); every recipe calls this once the masks are known (after grouping, for
    grouped masks)."""
    convert_share(scheduler, masks, structures)
    need = scheduler.max_alpha()
    if need == 0:
        return
    if structures is None:
        counts, total, unit = masks.counts(), masks.numel(), "entries"
    else:
        need = structures.alpha(need)
        counts, total, unit = structures.counts(masks.as_dict()), structures.n_structures, "structures"
    for g, c in enumerate(counts.tolist()):
        if need > c or need > total - c:
            raise MaskUpdateError(
                f"{key}: alpha reaches {need} but group {g} has {c} active and {total - c} inactive "
                f"{unit}; every update must drop and recover alpha {unit}. Lower {key}.eta_max (or "
                f"{key}.alpha), or use a density < 1 (a dense initializer leaves nothing to recover: "
                f"use scheduler=frozen)")


def structure_entries(structures: StructureMap, n: int) -> int:
    """The smallest α in entries that ``structures.alpha`` turns into ``n`` structures (0 for 0)."""
    if n <= 0:
        return 0
    e = max(1, int(math.floor(n * structures.structured_numel() / structures.n_structures)))
    while e > 1 and structures.alpha(e - 1) >= n:
        e -= 1
    while structures.alpha(e) < n:
        e += 1
    if structures.alpha(e) != n:  # alpha steps by at most 1 per entry (mean structure size >= 1)
        raise MaskUpdateError(f"no entry count converts to {n} structures")
    return e


def convert_share(scheduler: Scheduler, masks: MaskSet, structures: StructureMap | None = None) -> None:
    """``scheduler.unit=share``: set α's counts from the masks (a no-op for counts). The share is of
    the smallest group's active entries, or, with a structure map, of its active structures (the
    count is then handed to the scheduler as the entries ``StructureMap.alpha`` turns back into
    exactly that many structures)."""
    if getattr(scheduler, "unit", "count") != "share":
        return
    if structures is None:
        scheduler.set_active(int(masks.counts().min()))
    else:
        scheduler.set_active(int(structures.counts(masks.as_dict()).min()),
                             to_entries=lambda n: structure_entries(structures, n))


def unused_entries(per_group: Mapping[str, torch.Tensor] | None,
                   masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Per-group unused flags (name -> ``[G]``, ``GroupGradients.group_unused``) -> name -> ``[G, *P]``
    bool, the shape of ``masks``; ``None`` stays ``None``."""
    if per_group is None:
        return None
    out = {}
    for n, m in masks.items():
        u = per_group[n].to(m.device).reshape(-1, *([1] * (m.dim() - 1)))
        out[n] = u.expand(m.shape)
    return out


def _count_rows(x: torch.Tensor) -> torch.Tensor:
    """Set entries per row of a bool ``[G, *P]`` tensor, ``[G]`` int64 (a uint8 view: no int64 copy)."""
    x = x.reshape(x.shape[0], -1)
    return x.view(torch.uint8).sum(dim=1, dtype=torch.int64) if x.is_contiguous() else x.sum(dim=1)


def _entries(sets: Mapping[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """The set entries of name -> bool ``[G, *P]`` (small sets: drops, recoveries) as (group, flat
    index over all targets in ``names`` order) int64 tensors, and per target (name, group, index
    within the target) to read values there."""
    groups, flat, parts, offset = [], [], [], 0
    for n in names:
        t = sets[n]
        nz = t.reshape(t.shape[0], -1).nonzero()
        groups.append(nz[:, 0])
        flat.append(nz[:, 1] + offset)
        parts.append((n, nz[:, 0], nz[:, 1]))
        offset += t[0].numel()
    return torch.cat(groups), torch.cat(flat), parts


def _share_at(parts: list[tuple], values: Mapping[str, torch.Tensor], n_groups: int,
              count: torch.Tensor) -> float | None:
    """Mean over groups (with ``count > 0``) of the share of the listed entries where ``values``
    is exactly zero."""
    zeros = torch.zeros(n_groups, dtype=torch.int64)
    for n, g, k in parts:
        v = values[n].reshape(values[n].shape[0], -1)
        hit = v[g.to(v.device), k.to(v.device)] == 0
        zeros += torch.bincount(g[hit.to(g.device)].cpu(), minlength=n_groups)
    c = count.double()
    return _mean(torch.where(c > 0, zeros.double() / c.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64)))


def _set_matrix(groups: torch.Tensor, flat: torch.Tensor, columns: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[G, len(columns)]`` float 0/1: entry (g, c) set when (g, columns[c]) is listed."""
    out = torch.zeros((n_groups, columns.numel()), dtype=torch.float64)
    out[groups.cpu(), torch.searchsorted(columns, flat.cpu())] = 1.0
    return out


def _pair_jaccard(sets: torch.Tensor, n_groups: int) -> float | None:
    """Mean over pairs of groups of the Jaccard overlap of their sets (rows of a ``[G, C]`` 0/1 matrix)."""
    inter = sets @ sets.T
    size = sets.sum(dim=1)
    union = size[:, None] + size[None, :] - inter
    i, j = torch.triu_indices(n_groups, n_groups, offset=1)
    return _mean(torch.where(union[i, j] > 0, inter[i, j] / union[i, j].clamp_min(1), torch.tensor(float("nan"),
                                                                                                    dtype=torch.float64)))


def _mean(x: torch.Tensor) -> float | None:
    """Mean of the non-NaN values, ``None`` when there are none."""
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else None


def swap_diagnostics(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                     dropped: Mapping[str, torch.Tensor], recovered: Mapping[str, torch.Tensor],
                     drop_scores: Mapping[str, torch.Tensor], grow_scores: Mapping[str, torch.Tensor],
                     masked_grads: Mapping[str, torch.Tensor], dense_grads: Mapping[str, torch.Tensor],
                     terms: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None] | None = None,
                     initial: Mapping[str, torch.Tensor] | None = None,
                     last_dropped: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """What one mask update did, from tensors it already has (no gradient is recomputed). Every
    input is name -> ``[G, *P]``; each value is computed per group, then averaged over groups
    (groups where it is undefined, e.g. a share of zero drops, are left out of the mean; a key
    with no group defined is left out).

    * ``mask/changed``: entries newly active (recovered) per group; ``mask/changed_share``: that
      over the group's active entries. The swap turns off as many, so 2× that many entries differ.
    * ``mask/drop_zero_score_share`` / ``mask/recover_zero_score_share``: share of dropped
      (recovered) entries whose drop (recovery) score is exactly 0: chosen among ties.
    * ``mask/drop_zero_grad_share``: share of dropped entries whose masked gradient Σḡ is exactly
      0 (no agreement signal); ``mask/recover_zero_grad_share``: share of recovered entries whose
      recovery gradient Σg is exactly 0.
    * ``mask/agreement_dominates_share`` (``terms`` given, with an importance term): share of
      active entries where the agreement term of H is larger in magnitude than the importance
      term (paper weighting: |A| > λ·I), i.e. where agreement rather than importance decides.
    * ``mask/drop_jaccard_groups`` (2+ groups): Jaccard overlap of the drop sets of two groups,
      mean over pairs of groups (one group per task: pairs of tasks).
    * ``mask/changed_since_init`` / ``mask/changed_since_init_share`` (``initial`` given): entries
      active now and not in ``initial`` (equally many of ``initial`` are off now), per group, and
      that over the group's active entries.
    * ``mask/drop_jaccard_consecutive`` (``last_dropped`` given): Jaccard overlap of a group's drop
      set with its drop set at the previous update.

    Cost: a few passes over the masks (counting active entries, and ``initial`` / ``terms`` when
    given); drops and recoveries are handled as index lists.
    """
    names = list(before)
    n_groups = before[names[0]].shape[0]
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    n_active = sum(_count_rows(before[n]).cpu() for n in names).double()
    dg, df, dparts = _entries(dropped, names)
    rg, _, rparts = _entries(recovered, names)
    n_drop = torch.bincount(dg.cpu(), minlength=n_groups)
    n_rec = torch.bincount(rg.cpu(), minlength=n_groups)
    ratio = lambda num, den: _mean(torch.where(den > 0, num.double() / den.clamp_min(1), nan))  # noqa: E731
    out: dict[str, float | None] = {
        "mask/changed": float(n_rec.double().mean()),
        "mask/changed_share": ratio(n_rec, n_active),
        "mask/drop_zero_score_share": _share_at(dparts, drop_scores, n_groups, n_drop),
        "mask/recover_zero_score_share": _share_at(rparts, grow_scores, n_groups, n_rec),
        "mask/drop_zero_grad_share": _share_at(dparts, masked_grads, n_groups, n_drop),
        "mask/recover_zero_grad_share": _share_at(rparts, dense_grads, n_groups, n_rec),
    }
    if terms is not None and terms[1] is not None:
        wins = sum(_count_rows((terms[0][n].abs() > terms[1][n].abs()) & before[n].to(terms[0][n].device)).cpu()
                   for n in names)
        out["mask/agreement_dominates_share"] = ratio(wins, n_active)
    if n_groups > 1 or last_dropped is not None:
        cols = df.cpu()
        if last_dropped is not None:
            lg, lf, _ = _entries(last_dropped, names)
            cols = torch.cat([cols, lf.cpu()])
        cols = torch.unique(cols)  # sorted
        now = _set_matrix(dg, df, cols, n_groups)
        if n_groups > 1:
            out["mask/drop_jaccard_groups"] = _pair_jaccard(now, n_groups)
        if last_dropped is not None:
            prev = _set_matrix(lg, lf, cols, n_groups)
            inter = (now * prev).sum(dim=1)
            out["mask/drop_jaccard_consecutive"] = ratio(inter, now.sum(dim=1) + prev.sum(dim=1) - inter)
    if initial is not None:
        new_on = sum(_count_rows(after[n] & ~initial[n].to(after[n].device)).cpu() for n in names)
        out["mask/changed_since_init"] = float(new_on.double().mean())
        out["mask/changed_since_init_share"] = ratio(new_on, n_active)  # the swap keeps the active count
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class MaskUpdater:
    """Runs one mask update: estimate gradients, score, swap, fix optimizer state.

    Args:
        scorer: a ``Scorer``. Entries of a target that no task of a group uses (a per-task head
            of another task, an output the loss never reads) are not ranked by their scores: the
            group drops its active entries there first and recovers inactive ones there last
            (see ``swap``), since they cost density and do nothing for the group's tasks.
        scheduler: a ``Scheduler`` (α_t).
        every: t_m, steps between updates (0: never).
        recovery_gradient: ``"dense"`` (Algorithm 2) or ``"masked_point"`` (cheaper).
        recovered_state: ``"reset_dormant"`` zeroes optimizer moments of recovered entries that
            no group used before the update; ``"keep"`` leaves them.
        structures: a ``StructureMap`` makes the swap structured (scores aggregated per
            structure, α_t converted to structures); ``None`` swaps entries.
        diagnostics: add ``swap_diagnostics``' metrics (what the update changed, ties, which
            score term decides, drop-set overlaps) to what ``update`` returns. They reuse the
            update's gradients and scores: no extra backward pass.
        memory: ``"full"`` estimates every task's gradients, then scores and swaps every group
            at once (buffers of ``[N, P]`` and ``[G, P]`` floats: ~1 GB at N = 50, P = 1.2 M).
            ``"grouped"`` first sums the masked gradients into ĝ (one ``[P]`` buffer), then
            estimates, scores and swaps one group at a time, recomputing its tasks' masked
            gradients: the same masks (exactly, on the CPU) and metrics, buffers of a few ``[P]``
            per group's task, at one more masked backward per batch. Element masks only.

    Diagnostics that compare with earlier updates (changes since the initial masks, overlap with
    the previous update's drop sets) need state that a resumed run must get back, so they are
    opt-in: ``track(masks)`` takes the current masks as the initial ones and from then on
    ``update`` also returns ``mask/changed_since_init*`` and (from the second update on)
    ``mask/drop_jaccard_consecutive``. A caller that tracks must checkpoint ``state_dict()`` and
    restore it with ``load_state_dict``; an updater that does not track keeps no state at all.
    """

    scorer: Scorer
    scheduler: Scheduler
    every: int
    recovery_gradient: str = "dense"
    recovered_state: str = "reset_dormant"
    structures: StructureMap | None = None
    diagnostics: bool = True
    memory: str = "full"

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"masking.update_every must be >= 0, got {self.every}")
        if self.recovery_gradient not in RECOVERY_GRADIENTS:
            raise ValueError(f"masking.recovery_gradient must be one of {RECOVERY_GRADIENTS}, got {self.recovery_gradient!r}")
        if self.recovered_state not in RECOVERED_STATE:
            raise ValueError(f"masking.recovered_state must be one of {RECOVERED_STATE}, got {self.recovered_state!r}")
        if not isinstance(self.diagnostics, bool):
            raise ValueError(f"diagnostics must be a bool, got {self.diagnostics!r}")
        if self.memory not in UPDATE_MEMORY:
            raise ValueError(f"masking.update_memory must be one of {UPDATE_MEMORY}, got {self.memory!r}")
        if self.memory == "grouped" and self.structures is not None:
            raise ValueError("masking.update_memory=grouped swaps element masks only; with masking.granularity="
                             "unit|head use masking.update_memory=full")
        self._initial: dict[str, torch.Tensor] | None = None
        self._last_dropped: dict[str, torch.Tensor] | None = None

    # ---- opt-in tracking across updates ---------------------------------------------------
    @property
    def tracking(self) -> bool:
        return self._initial is not None

    def track(self, masks: MaskSet | Mapping[str, torch.Tensor]) -> None:
        """Take a copy of ``masks`` (a ``MaskSet`` or name -> ``[G, *P]``) as the initial masks
        for ``mask/changed_since_init*``, and forget any previous drop sets. Call it when the
        masks are initialised (G-HarmoDT: again after grouping, which replaces them)."""
        d = masks.as_dict() if isinstance(masks, MaskSet) else dict(masks)
        if not d or any(m.dtype != torch.bool for m in d.values()):
            raise MaskUpdateError("track: expected bool masks name -> [G, *P]")
        self._initial = {n: m.detach().clone() for n, m in d.items()}
        self._last_dropped = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the tracked diagnostics (bool tensors on the CPU;
        loadable with ``torch.load(weights_only=True)``). Empty when not tracking."""
        cpu = lambda d: None if d is None else {n: t.cpu() for n, t in d.items()}  # noqa: E731
        return {} if self._initial is None else {"initial": cpu(self._initial), "last_dropped": cpu(self._last_dropped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output (an empty dict: not tracking)."""
        if not state:
            self._initial = self._last_dropped = None
            return
        if "initial" not in state or not isinstance(state["initial"], Mapping):
            raise MaskUpdateError(f"updater state must hold 'initial' masks, got keys {sorted(state)}")
        self._initial = {n: t.clone() for n, t in state["initial"].items()}
        last = state.get("last_dropped")
        self._last_dropped = None if last is None else {n: t.clone() for n, t in last.items()}

    def _tracked(self, before: Mapping[str, torch.Tensor]) -> tuple[dict | None, dict | None]:
        if self._initial is None:
            return None, None
        for ref, what in ((self._initial, "initial masks"), (self._last_dropped, "previous drop sets")):
            if ref is None:
                continue
            if set(ref) != set(before) or any(tuple(ref[n].shape) != tuple(before[n].shape) for n in before):
                raise MaskUpdateError(
                    f"the tracked {what} do not fit the masks (targets or group count differ: "
                    f"regrouped?); call track(masks) again after the masks are replaced")
        dev = lambda d: None if d is None else {n: t.to(before[n].device) for n, t in d.items()}  # noqa: E731
        return dev(self._initial), dev(self._last_dropped)

    def due(self, step: int) -> bool:
        """Whether an update runs after optimizer step ``step`` (1-based): every t_m steps."""
        return self.every > 0 and step > 0 and step % self.every == 0 and self.scheduler.alpha(step) > 0

    def update(self, step: int, model: nn.Module, masks: MaskSet, loss_fn: LossFn, batches: Batches,
               optimizer: Any = None, progress=None) -> dict[str, float]:
        """Update ``masks`` in place; returns ``mask/…`` metrics."""
        if self.memory == "grouped":
            return self._update_grouped(step, model, masks, loss_fn, batches, optimizer, progress)
        t0 = time.perf_counter()
        alpha = self.scheduler.alpha(step)
        grads = estimate_gradients(model, masks, loss_fn, batches, recovery=self.recovery_gradient, progress=progress)
        t_grad = time.perf_counter() - t0
        params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
        before = masks.as_dict()  # views: read before set_masks below
        if isinstance(self.scorer, StepAwareScorer):
            self.scorer.begin_update(step)
        drop, grow, terms = self._scores(grads, params, before)
        unused = unused_entries(grads.group_unused(), before)
        if self.structures is None:
            result = swap(before, drop, grow, alpha, unused=unused)
        else:
            result = self.structures.swap(before, drop, grow, self.structures.alpha(alpha), unused=unused)
        h = harmony(grads, before)
        revived = {n: result.masks[n].any(dim=0) & ~before[n].any(dim=0) for n in masks.names}
        diag, t_diag = None, 0.0
        if self.diagnostics:  # from the masks before the update: ``before`` are views of them
            t1 = time.perf_counter()
            initial, last = self._tracked(before)
            diag = swap_diagnostics(before, result.masks, result.dropped, result.recovered, drop, grow,
                                    grads.masked, grads.dense, terms=terms, initial=initial, last_dropped=last)
            if self.tracking:
                self._last_dropped = {n: t.detach().clone() for n, t in result.dropped.items()}
            t_diag = time.perf_counter() - t1
        return self._apply(masks, result.masks, revived, optimizer, alpha=alpha, harmony=h, swapped=result.alpha,
                           diag=diag, t_diag=t_diag, t0=t0, t_grad=t_grad)

    def _apply(self, masks: MaskSet, new: Mapping[str, torch.Tensor], revived: Mapping[str, torch.Tensor],
               optimizer: Any, *, alpha: int, harmony: float, swapped: int, diag: dict | None, t_diag: float,
               t0: float, t_grad: float) -> dict[str, float]:
        """The end of both updates: write the new masks, reset the revived entries' optimizer state,
        and the metrics (``swapped``: α per group, in entries or structures)."""
        masks.set_masks(new)
        n_reset = 0
        if optimizer is not None and self.recovered_state == "reset_dormant":
            n_reset = optimizer.reset_entries(revived)
        out = {
            "mask/alpha": float(alpha),
            "mask/harmony": harmony,
            "mask/density_mean": float(masks.density().mean()),
            "mask/swapped": float(2 * swapped * masks.n_groups),  # entries, or structures if structured
            "mask/revived": float(sum(int(r.sum()) for r in revived.values())),
            "mask/optimizer_entries_reset": float(n_reset),
        }
        if diag is not None:
            out.update(diag)
            out["time/mask_diagnostics_s"] = t_diag
        out["time/mask_update_s"] = time.perf_counter() - t0
        out["time/mask_gradients_s"] = t_grad
        return out

    def _scores(self, grads: GroupGradients, params, before) -> tuple[dict, dict, tuple | None]:
        """Drop and recovery scores, and the drop score's terms when the diagnostics read them."""
        terms = None
        if self.diagnostics and isinstance(self.scorer, TermScorer):
            drop, terms = self.scorer.drop_scores_and_terms(grads, params, before)
        else:
            drop = self.scorer.drop_scores(grads, params, before)
        return drop, self.scorer.grow_scores(grads), terms

    def _update_grouped(self, step, model, masks, loss_fn, batches, optimizer, progress) -> dict[str, float]:
        """``update`` one group at a time (``memory="grouped"``): the arithmetic of the full update
        (``TaskGradients``, sums in the same order, the same scorer and swap on one group's row),
        so the masks come out the same. ``progress`` is called after each task of the second pass."""
        t0 = time.perf_counter()
        alpha = self.scheduler.alpha(step)
        names, t2g, n_groups = masks.names, list(masks.task_to_group), masks.n_groups
        members = [[i for i, g in enumerate(t2g) if g == j] for j in range(n_groups)]
        single = all(len(m) == 1 for m in members)
        one = TaskGradients(model, masks, loss_fn, batches, self.recovery_gradient)
        params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
        task_loss = torch.zeros(masks.n_tasks, dtype=torch.float64)

        def group_sum(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            if single:  # the full update's masked[j] is task j's row itself
                return rows[0]
            return {n: group_order_sum([torch.zeros_like(rows[0][n]), *(r[n] for r in rows)]) for n in names}

        # pass 1: ĝ = (1/G) Σ_j Σ_{i∈G_j} ḡ_i, group by group
        with one.eval_mode():
            sums = None
            for j in range(n_groups):
                g_j = group_sum([one(i, loss=task_loss, dense=False)[0] for i in members[j]])
                sums = {n: t.clone() for n, t in g_j.items()} if sums is None else \
                    {n: sums[n].add_(g_j[n]) for n in names}
            mean = {n: sums[n] / n_groups for n in names}
        del sums
        t_grad = time.perf_counter() - t0
        before = masks.as_dict()  # views: the rows are read before set_masks below
        if isinstance(self.scorer, StepAwareScorer):
            self.scorer.begin_update(step)
        initial, last = self._tracked(before) if self.diagnostics else (None, None)
        new = {n: m.clone() for n, m in before.items()}
        dropped_all = {n: torch.zeros_like(m) for n, m in before.items()} if self.tracking and self.diagnostics \
            else None
        h_total = torch.zeros(masks.n_tasks, dtype=torch.float64)
        h_count = torch.zeros(masks.n_tasks, dtype=torch.float64)
        diags: list[dict[str, float]] = []
        drop_rows, drop_flat = [], []
        swapped_alpha, t_diag = 0, 0.0
        # pass 2: each group's gradients, scores and swap
        for j in range(n_groups):
            t1 = time.perf_counter()
            used = {n: torch.zeros(masks.n_tasks, dtype=torch.bool) for n in names}
            rows, dense = [], {n: torch.zeros_like(params[n]) for n in names}
            with one.eval_mode():
                for i in members[j]:
                    masked_i, dense_i, count = one(i, used=used)
                    rows.append(masked_i)
                    for n in names:
                        dense[n].add_(dense_i[n], alpha=1.0 / count)
                    if progress is not None:
                        progress(i)
            t_grad += time.perf_counter() - t1
            idx = members[j]
            g_j = group_sum(rows)
            loss_j = torch.zeros(1, dtype=torch.float64).index_add_(0, torch.zeros(len(idx), dtype=torch.long),
                                                                     task_loss[idx])
            grads = GroupGradients(masked={n: g_j[n][None] for n in names}, dense={n: dense[n][None] for n in names},
                                   loss=loss_j, mean=mean,
                                   task_masked={n: torch.stack([r[n] for r in rows]) for n in names},
                                   task_loss=task_loss[idx], task_to_group=[0] * len(idx),
                                   task_unused={n: ~used[n][idx] for n in names}, group_ids=[j])
            before_j = {n: before[n][j:j + 1] for n in names}
            drop, grow, terms = self._scores(grads, params, before_j)
            try:
                result = swap(before_j, drop, grow, alpha, unused=unused_entries(grads.group_unused(), before_j))
            except MaskUpdateError as e:  # its messages count groups of the slice
                raise MaskUpdateError(str(e).replace("group 0:", f"group {j}:", 1)) from e
            swapped_alpha = result.alpha
            tot, cnt = harmony_terms(grads, before_j)
            h_total[idx], h_count[idx] = tot, cnt
            for n in names:
                new[n][j] = result.masks[n][0]
            if self.diagnostics:
                t1 = time.perf_counter()
                init_j = None if initial is None else {n: initial[n][j:j + 1] for n in names}
                last_j = None if last is None else {n: last[n][j:j + 1] for n in names}
                diags.append(swap_diagnostics(before_j, result.masks, result.dropped, result.recovered, drop, grow,
                                              grads.masked, grads.dense, terms=terms, initial=init_j,
                                              last_dropped=last_j))
                _, flat, _ = _entries(result.dropped, names)
                drop_rows.append(torch.full_like(flat, j))
                drop_flat.append(flat)
                if dropped_all is not None:
                    for n in names:
                        dropped_all[n][j] = result.dropped[n][0]
                t_diag += time.perf_counter() - t1
        h = float((h_total / h_count.clamp_min(1)).mean())
        revived = {n: new[n].any(dim=0) & ~before[n].any(dim=0) for n in names}
        diag = None
        if self.diagnostics:
            t1 = time.perf_counter()
            diag = {}
            for key in dict.fromkeys(k for d in diags for k in d):  # mean over the groups that define it
                vals = torch.tensor([d[key] for d in diags if key in d], dtype=torch.float64)
                diag[key] = float(vals.mean())
            if n_groups > 1:
                dg, df = torch.cat(drop_rows).cpu(), torch.cat(drop_flat).cpu()
                cols = torch.unique(df)
                jac = _pair_jaccard(_set_matrix(dg, df, cols, n_groups), n_groups)
                if jac is not None:
                    diag["mask/drop_jaccard_groups"] = jac
            if dropped_all is not None:
                self._last_dropped = dropped_all
            t_diag += time.perf_counter() - t1
        return self._apply(masks, new, revived, optimizer, alpha=alpha, harmony=h, swapped=swapped_alpha, diag=diag,
                           t_diag=t_diag, t0=t0, t_grad=t_grad)


def group_tasks(model: nn.Module, masks: MaskSet, scorer: Scorer, grouper: Any, loss_fn: LossFn,
                batches: Batches, density: float, seed: int, recovery_gradient: str = "dense",
                structures: StructureMap | None = None) -> dict[str, Any]:
    """G-HarmoDT stage 2 (Algorithm 4): group tasks and initialise one mask per group, in place.

    Each task's harmony vector GH(T_i, 1) is scored with all-ones masks and one group per task;
    the grouper clusters those vectors; each group's mask keeps the ``round(density·|θ|)`` entries
    with the highest summed harmony Σ_{i∈G_j} GH(T_i, 1) over all targets.

    With a structure map, the task vectors are the aggregated structure scores ``[N, S]`` and
    each group keeps ``round(density·S)`` structures.

    Returns ``{"task_to_group", "task_vectors" [N, D], "harmony"}``.
    """
    ones = MaskSet({n: torch.ones((masks.n_tasks, *m.shape[1:]), dtype=torch.bool, device=m.device)
                    for n, m in masks.items()}, masks.tasks)
    grads = estimate_gradients(model, ones, loss_fn, batches, recovery=recovery_gradient)
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    scores = scorer.drop_scores(grads, params, ones.as_dict())  # [N, *P] per target
    if structures is None:
        vectors = torch.cat([scores[n].reshape(masks.n_tasks, -1) for n in masks.names], dim=1)
    else:
        vectors = structures.aggregate(scores).float()
    t2g = grouper.group(vectors, seed)
    n_groups = max(t2g) + 1
    idx = torch.tensor(t2g)
    summed = {n: torch.zeros((n_groups, *s.shape[1:]), dtype=s.dtype, device=s.device).index_add_(0, idx.to(s.device), s)
              for n, s in scores.items()}
    pick = masks_from_scores if structures is None else structures.masks_from_scores
    unused = unused_entries(unused_by_group(grads.task_unused, t2g), summed)
    masks.set_grouping(t2g, pick(summed, density, unused=unused))
    return {"task_to_group": t2g, "task_vectors": vectors, "harmony": harmony(grads, ones.as_dict())}
