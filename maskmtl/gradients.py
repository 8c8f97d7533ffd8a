"""Gradient estimates for the mask update (spec §2-3, Algorithms 2 and 5).

For every task i (in group j = task_to_group[i]), averaged over ``n`` batches, in eval mode
(dropout off):

    ḡ_i = ∇L_i(θ ⊙ M_j) ⊙ M_j      masked gradient (agreement, Fisher)
    g_i = ∇L_i(θ)                  dense gradient (recovery ranking), ``recovery="dense"``
    g_i = ∇_w L_i(w)|_{w=θ⊙M_j}    gradient at the masked point, without the final ⊙M_j,
                                   ``recovery="masked_point"`` (one backward serves both)
    L_i                            mean loss

Both recovery choices are informative at inactive entries, which is what recovery ranks; the
published code's ``g_i ⊙ M_i`` (all inactive candidates tie at zero) is not offered.

A target that task i's loss does not use at all (autograd finds no path from L_i to it: a
per-task head of another task, a pooler whose output the loss never reads) gets ḡ_i = g_i = 0
there, and is recorded as unused by task i (``GroupGradients.task_unused``). With zero gradients,
its agreement A and Fisher importance I for that task are zero (magnitude importance |θ⊙M| is not:
it does not look at gradients). The mask update (``maskmtl.update``) therefore does not rank such
entries by their scores: a group's active entries on a target that none of its tasks uses are
dropped first (they cost the group density and do nothing for its tasks), and its inactive ones
there are recovered last. A loss that uses none of the targets is an error.

Group sums (plain HarmoDT has one task per group, and these reduce to the per-task values):

    masked[j] = Σ_{i∈G_j} ḡ_i,   dense[j] = Σ_{i∈G_j} g_i,   loss[j] = Σ_{i∈G_j} L_i
    mean      = (1/G) Σ_j masked[j]                        (ĝ; for G = N the tasks' mean)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from .masks import MaskSet

# loss_fn(forward, task_index, batch) -> scalar loss; forward(*args, **kwargs) runs the model.
LossFn = Callable[[Callable[..., Any], int, Any], torch.Tensor]
Batches = Callable[[int], Iterable[Any]]

RECOVERY_GRADIENTS = ("dense", "masked_point")


@dataclass
class GroupGradients:
    """Gradient statistics of one mask update. Shapes: ``G`` groups, ``N`` tasks, ``P`` param."""

    masked: dict[str, torch.Tensor]  # [G, *P]  Σ_{i∈G_j} ḡ_i
    dense: dict[str, torch.Tensor]  # [G, *P]  Σ_{i∈G_j} g_i
    loss: torch.Tensor  # [G]      Σ_{i∈G_j} L_i
    mean: dict[str, torch.Tensor]  # [P]      ĝ = (1/G) Σ_j masked[j]
    task_masked: dict[str, torch.Tensor]  # [N, *P]  ḡ_i per task (harmony diagnostic, grouping)
    task_loss: torch.Tensor  # [N]
    task_to_group: list[int]
    task_unused: dict[str, torch.Tensor] | None = None  # [N] bool: task i's loss does not use the target
    group_ids: list[int] | None = None  # the groups the G rows are (None: 0..G-1; a slice of one group: [j])

    def groups(self) -> list[int]:
        """The group index of each row (``group_ids``, else ``0..G-1``)."""
        n = next(iter(self.masked.values())).shape[0]
        return list(range(n)) if self.group_ids is None else list(self.group_ids)

    def group_unused(self) -> dict[str, torch.Tensor] | None:
        """Target name -> ``[G]`` bool: no task of group j uses the target (``None``: every group
        uses every target, or nothing was recorded)."""
        return unused_by_group(self.task_unused, self.task_to_group)


def unused_by_group(task_unused: dict[str, torch.Tensor] | None,
                    task_to_group: list[int]) -> dict[str, torch.Tensor] | None:
    """Per-task ``[N]`` unused flags -> per-group ``[G]``: True where every task of the group leaves
    the target unused. ``None`` when no group leaves any target unused."""
    if task_unused is None:
        return None
    idx = torch.tensor(list(task_to_group))
    n_groups = max(task_to_group) + 1
    out = {}
    for n, u in task_unused.items():
        users = torch.zeros(n_groups, dtype=torch.long).index_add_(0, idx, (~u.cpu()).long())
        out[n] = users == 0
    return out if any(bool(u.any()) for u in out.values()) else None


def estimate_gradients(
    model: nn.Module,
    masks: MaskSet,
    loss_fn: LossFn,
    batches: Batches,
    *,
    recovery: str = "dense",
    progress: Callable[[int], None] | None = None,
) -> GroupGradients:
    """Estimate ḡ_i, g_i and L_i for every task and sum them per group.

    Args:
        model: the shared network.
        masks: current masks (read only).
        loss_fn: ``loss_fn(forward, task_index, batch)``; called with the masked forward.
        batches: ``batches(task_index)`` yields the batches to average over (at least one).
        recovery: ``"dense"`` or ``"masked_point"`` (see module docstring).
        progress: called with the task index after each task.
    """
    if recovery not in RECOVERY_GRADIENTS:
        raise ValueError(f"masking.recovery_gradient must be one of {RECOVERY_GRADIENTS}, got {recovery!r}")
    names = masks.names
    masks.check_model(model)
    params = {n: p for n, p in model.named_parameters() if n in masks.names}
    n_tasks, n_groups = masks.n_tasks, masks.n_groups
    task_masked = {n: torch.zeros((n_tasks, *params[n].shape), dtype=params[n].dtype, device=params[n].device) for n in names}
    dense = {n: torch.zeros((n_groups, *params[n].shape), dtype=params[n].dtype, device=params[n].device) for n in names}
    task_loss = torch.zeros(n_tasks, dtype=torch.float64)
    used = {n: torch.zeros(n_tasks, dtype=torch.bool) for n in names}
    one = TaskGradients(model, masks, loss_fn, batches, recovery)
    with one.eval_mode():
        for i in range(n_tasks):
            j = masks.task_to_group[i]
            masked_i, dense_i, count = one(i, out=task_masked, loss=task_loss, used=used)
            for n in names:
                dense[n][j].add_(dense_i[n], alpha=1.0 / count)
            if progress is not None:
                progress(i)
    return _group_sums(task_masked, dense, task_loss, masks.task_to_group, {n: ~u for n, u in used.items()})


class TaskGradients:
    """One task's gradient estimates for the mask update, the arithmetic ``estimate_gradients``
    and the group-at-a-time update (``MaskUpdater(memory="grouped")``) share, so both give the same
    numbers. ``__call__(i)`` averages ḡ_i over ``batches(i)`` into ``out[n][i]`` (or a fresh [P]
    tensor), records L_i and which targets the loss used, and returns (ḡ_i, the sum over batches of
    the recovery gradient, the batch count). Call it inside ``eval_mode()`` (dropout off)."""

    def __init__(self, model: nn.Module, masks: MaskSet, loss_fn: LossFn, batches: Batches, recovery: str):
        self.model, self.masks, self.loss_fn, self.batches, self.recovery = model, masks, loss_fn, batches, recovery
        self.names = masks.names
        self.params = {n: p for n, p in model.named_parameters() if n in masks.names}

    @contextmanager
    def eval_mode(self):
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    def grad_at(self, weights: dict[str, torch.Tensor], task: int, batch: Any) -> tuple[torch.Tensor, list]:
        """Loss and its gradient w.r.t. each target (``None`` for a target the loss does not use)."""
        names, masks, model = self.names, self.masks, self.model
        leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
        fwd = lambda *a, **k: functional_call(model, leaves, a, k)  # noqa: E731
        loss = self.loss_fn(fwd, task, batch)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} for task "
                             f"{task} ({masks.tasks[task]!r})")
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)} for task "
                             f"{task} ({masks.tasks[task]!r})")
        leaf_list = [leaves[n] for n in names]
        grads = [None] * len(names)
        if loss.requires_grad:  # allow_unused: a target the loss does not use gets None (a zero gradient)
            grads = list(torch.autograd.grad(loss, leaf_list, allow_unused=True))
        if all(gr is None for gr in grads):
            few = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
            raise ValueError(
                f"the loss of task {task} ({masks.tasks[task]!r}) depends on none of the {len(names)} mask "
                f"targets ({few}): loss_fn(forward, task, batch) must compute its loss from the outputs of "
                f"the forward it is given (a constant loss, or one using only unmasked parameters, leaves "
                f"nothing to score)")
        return loss.detach(), grads

    def __call__(self, i: int, *, out: dict[str, torch.Tensor] | None = None, loss: torch.Tensor | None = None,
                 used: dict[str, torch.Tensor] | None = None, dense: bool = True):
        names, params, masks = self.names, self.params, self.masks
        m = masks.group(masks.task_to_group[i])
        masked_i = ({n: out[n][i] for n in names} if out is not None
                    else {n: torch.zeros_like(params[n]) for n in names})
        dense_i = {n: torch.zeros_like(params[n]) for n in names}
        count = 0
        for batch in self.batches(i):
            count += 1
            with torch.no_grad():
                w = {n: torch.where(m[n], params[n], 0.0) for n in names}
            loss_b, grads = self.grad_at(w, i, batch)
            if loss is not None:
                loss[i] += loss_b.double().cpu()
            for n, gr in zip(names, grads):
                if gr is None:  # unused by this task's loss: a zero gradient
                    continue
                if used is not None:
                    used[n][i] = True
                masked_i[n].add_(torch.where(m[n], gr, 0.0))
                if self.recovery == "masked_point" and dense:
                    dense_i[n].add_(gr)
            if self.recovery == "dense" and dense:
                _, dgrads = self.grad_at({n: params[n] for n in names}, i, batch)
                for n, gr in zip(names, dgrads):
                    if gr is not None:
                        if used is not None:
                            used[n][i] = True
                        dense_i[n].add_(gr)
        if count == 0:
            raise ValueError(f"batches({i}) yielded no batch for task {masks.tasks[i]!r}")
        if loss is not None:
            loss[i] /= count
        for n in names:
            masked_i[n].div_(count)
        return masked_i, dense_i, count


def group_order_sum(rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ of ``rows`` added one after another in the given order (the mean gradient ĝ's sum over
    groups: the full and the group-at-a-time update add in the same order, so they agree exactly)."""
    acc = None
    for r in rows:
        acc = r.clone() if acc is None else acc.add_(r)
    return acc


def _group_sums(task_masked, dense, task_loss, task_to_group, task_unused=None):
    n_groups = max(task_to_group) + 1
    idx = torch.tensor(task_to_group)
    if list(task_to_group) == list(range(len(task_to_group))):
        masked = task_masked  # one task per group: the same tensors, no copy
    else:
        masked = {}
        for n, t in task_masked.items():
            s = torch.zeros((n_groups, *t.shape[1:]), dtype=t.dtype, device=t.device)
            masked[n] = s.index_add_(0, idx.to(t.device), t)
    loss = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, task_loss)
    mean = {n: group_order_sum(t.unbind(0)) / n_groups for n, t in masked.items()}
    return GroupGradients(masked=masked, dense=dense, loss=loss, mean=mean, task_masked=task_masked,
                          task_loss=task_loss, task_to_group=list(task_to_group), task_unused=task_unused)


def harmony(grads: GroupGradients, masks: dict[str, torch.Tensor]) -> float:
    """Averaged harmony score (Def. 3.2) on the masked gradients, in [-1, 1].

    ``(1/N) Σ_i mean_{j ∈ M_i} sign(ḡ_i,j · ĝ_j)``: each task is averaged over the entries its
    group's mask keeps (with all-ones masks this is the paper's ``1/(NK) Σ_i Σ_j sign(g_i,j ĝ_j)``).
    ``masks`` are the masks the gradients were taken with. Targets a task's loss does not use
    (``grads.task_unused``) are left out of that task's average.
    """
    total, count = harmony_terms(grads, masks)
    return float((total / count.clamp_min(1)).mean())


def harmony_terms(grads: GroupGradients, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task (``[N]`` float64): Σ of sign(ḡ_i ĝ) over the entries its mask keeps, and their count."""
    n_tasks = grads.task_loss.numel()
    total = torch.zeros(n_tasks, dtype=torch.float64)
    count = torch.zeros(n_tasks, dtype=torch.float64)
    for n, tm in grads.task_masked.items():
        m = masks[n][grads.task_to_group]  # [N, *P]
        if grads.task_unused is not None and bool(grads.task_unused[n].any()):
            keep = ~grads.task_unused[n].to(m.device)
            m = m & keep.reshape(-1, *([1] * (m.dim() - 1)))
        s = torch.sign(tm * grads.mean[n]) * m
        total += s.reshape(n_tasks, -1).sum(dim=1).double().cpu()
        count += m.reshape(n_tasks, -1).sum(dim=1).double().cpu()
    return total, count
