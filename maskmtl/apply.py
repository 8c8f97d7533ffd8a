"""Masked training (spec §1): the forward sees θ⊙M, the gradient is ∇L(θ⊙M)⊙M, and an optimizer
step changes nothing outside the mask.

* ``MaskedModel`` calls any module through ``torch.func.functional_call`` with each target
  parameter replaced by ``θ ⊙ M`` (a multi-tensor multiply by 0/1 masks). Autograd yields exactly
  ``∇L(θ⊙M)⊙M`` in ``θ.grad``; θ itself is never modified (other tasks use the entries this task
  does not), and nothing is copied besides the one masked tensor per target.
* ``MaskedAdamW`` is AdamW whose whole update (moments, weight decay, parameter) is gated by the
  group's mask: entries outside it keep their value and their optimizer moments bit for bit.

Optimizer state is shared by all tasks, one pair of moments per entry, because the parameter is
shared. The bias-correction step count is per tensor (as in torch's AdamW), counting every step
the tensor took part in. When a mask update recovers an entry that no group was using before
("dormant"), its moments are stale (from before it went dormant); ``MaskedAdamW.reset_entries``
zeroes them, which the mask updater does by default (``masking.recovered_state=reset_dormant``;
``keep`` leaves them). Recovered entries that another group was still training keep their moments:
they are current.

``MaskedAdamW(impl=...)`` chooses how the update runs (``train.optimizer_impl``): ``reference``
(the default) runs it as multi-tensor (foreach) kernels, one pass over memory per operation;
``compiled`` runs the same update through ``torch.compile`` as fused loops (one pass over each
tensor), several times faster on a CPU. The compiled update is the same AdamW and leaves entries
outside the mask bit for bit unchanged (a ``where`` on the mask), but its in-mask values differ
from ``reference`` by float rounding (a few ulp: the fused code contracts multiply-adds
differently), so a run changes rounding when it switches. Where ``torch.compile`` is unavailable
or fails, ``compiled`` warns once and runs the same function eagerly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .masks import MaskError, MaskSet, MaskTargetError, check_masks_fit_model


class MaskedModel:
    """Runs ``model`` under one group's masks.

    Args:
        model: any module; its target parameters are named in ``masks``.
        masks: the ``MaskSet`` (targets, tasks, task -> group).
    """

    def __init__(self, model: nn.Module, masks: MaskSet):
        self.model = model
        self.masks = masks
        # every target is a parameter of the model, its mask exactly [groups, *param.shape]
        masks.check_model(model)
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in masks.names}
        # Every name under which a target is registered (tied weights have several). Substituting
        # all of them ourselves lets functional_call skip its per-call search for tied weights.
        self.aliases: dict[str, list[str]] = {n: [] for n in masks.names}
        by_id = {id(p): n for n, p in self.params.items()}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in by_id:
                self.aliases[by_id[id(p)]].append(name)

    def masked_params(self, group: int, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Target name -> ``θ ⊙ M_group`` (differentiable w.r.t. θ; zero outside the mask).

        One multi-tensor multiply by the 0/1 masks for all targets (a launch or two instead of one
        ``where`` per target, which dominated small steps on a GPU); its backward is the same
        multiply, so ``θ.grad = ∇L(θ⊙M)⊙M``. Equal to ``where(M, θ, 0)`` for finite θ.
        """
        group = self.masks.group_index(group)
        params = self.params if params is None else params
        names = self.masks.names
        ws = [params[n] for n in names]
        ms = [self.masks.float_group(n, w.dtype, group) for n, w in zip(names, ws)]
        return dict(zip(names, torch._foreach_mul(ws, ms)))

    def forward_group(self, group: int | None, *args, **kwargs) -> Any:
        """Forward with group ``group``'s masks; ``None`` runs the dense model."""
        if group is None:
            return self.model(*args, **kwargs)
        masked = self.masked_params(group)
        weights = {alias: w for n, w in masked.items() for alias in self.aliases[n]}
        return functional_call(self.model, weights, args, kwargs, tie_weights=False)

    def __call__(self, task: int | str, *args, **kwargs) -> Any:
        """Forward for ``task`` (index or name) with its group's masks."""
        return self.forward_group(self.masks.group_of(task), *args, **kwargs)

    def bind(self, task: int | str | None) -> Callable[..., Any]:
        """A callable ``forward(*args, **kwargs)`` for one task (``None``: dense). The task is
        checked here, once."""
        group = None if task is None else self.masks.group_of(task)
        return lambda *args, **kwargs: self.forward_group(group, *args, **kwargs)


OPTIMIZER_IMPLS = ("reference", "compiled")


def _scalars(lr, b1, b2, eps, wd, t, device) -> tuple[torch.Tensor, ...]:
    """The update's scalars as 0-d float64 tensors, so a compiled update is not recompiled when the
    learning rate or the step count changes."""
    bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
    return tuple(torch.tensor(x, dtype=torch.float64, device=device)
                 for x in (lr, 1 - b1, 1 - b2, eps, wd, bc1, bc2_sqrt))


def _adamw_update(ps, gs, avgs, sqs, ms, lr, a1, a2, eps, wd, bc1, bc2_sqrt) -> None:
    """AdamW on lists of tensors, in place; with ``ms`` (0/1 masks) only entries where the mask is 1
    change (``where``: the others keep parameter and moments bit for bit). Written per tensor with
    0-d tensor scalars so that ``torch.compile`` fuses each tensor's update into one loop, and so
    that it runs unchanged eagerly."""
    for i, (p, g, m, v) in enumerate(zip(ps, gs, avgs, sqs)):
        m_new = m + a1 * (g - m)
        v_new = v + a2 * (g * g - v)
        denom = v_new.sqrt() / bc2_sqrt + eps
        p_new = p - lr / bc1 * (m_new / denom + wd * bc1 * p)
        if ms is not None:
            keep = ms[i] == 0
            m_new, v_new, p_new = m_new.where(~keep, m), v_new.where(~keep, v), p_new.where(~keep, p)
        m.copy_(m_new)
        v.copy_(v_new)
        p.copy_(p_new)


_COMPILED: dict[str, Callable] = {}


def _compiled_update(*args) -> None:
    """``_adamw_update`` through ``torch.compile`` (compiled on first use); eagerly, with one warning,
    where compiling is unavailable or fails."""
    fn = _COMPILED.get("update")
    if fn is None:
        try:
            fn = torch.compile(_adamw_update, dynamic=False)
        except Exception as e:  # no compile support in this build / platform
            warnings.warn(f"MaskedAdamW(impl='compiled'): torch.compile unavailable ({e}); running eagerly")
            fn = _adamw_update
        _COMPILED["update"] = fn
    if fn is _adamw_update:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as e:  # e.g. no C++ compiler for inductor's CPU code
        warnings.warn(f"MaskedAdamW(impl='compiled'): compiling the update failed ({type(e).__name__}: {e}); "
                      f"running it eagerly")
        _COMPILED["update"] = _adamw_update
        return _adamw_update(*args)


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose update is confined to the active group's mask on target parameters.

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        masks: the ``MaskSet``; parameters it names are masked targets, others update densely.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        impl: ``reference`` (multi-tensor kernels) or ``compiled`` (``torch.compile``; module docstring).

    ``step(group=j)`` updates target entries inside ``M_j`` only; ``step(group=None)`` is a plain
    dense AdamW step (used for dense warm-up). Non-target parameters always update densely.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        masks: MaskSet,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        impl: str = "reference",
    ):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not 0.0 < lr:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
        self.impl = impl
        super().__init__([p for _, p in named], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.masks = masks
        self._name = {id(p): n for n, p in named}
        unknown = set(masks.names) - set(self._name.values())
        if unknown:
            raise MaskTargetError(f"masked targets not among the optimizer's parameters: {sorted(unknown)} "
                                  f"(pass model.named_parameters(), with requires_grad on the targets)")
        check_masks_fit_model(masks.as_dict(), {n: p for n, p in named if n in masks.names})

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, group: int | None = None):  # type: ignore[override]
        if group is not None:
            group = self.masks.group_index(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for pg in self.param_groups:
            lr, (b1, b2), eps, wd = pg["lr"], pg["betas"], pg["eps"], pg["weight_decay"]
            # step count -> [params, grads, exp_avgs, exp_avg_sqs] (+ [masks] for masked targets); each
            # bucket is updated with multi-tensor (foreach) kernels, like torch's AdamW
            dense: dict[float, list] = {}
            masked: dict[float, list] = {}
            for p in pg["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p)
                state["step"] += 1
                t = state["step"].item()
                name = self._name[id(p)]
                entry = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if group is not None and name in self.masks.names:
                    entry += (self.masks.float_group(name, p.dtype, group),)
                    bucket = masked.setdefault(t, [[], [], [], [], []])
                else:
                    bucket = dense.setdefault(t, [[], [], [], []])
                for lst, x in zip(bucket, entry):
                    lst.append(x)
            if self.impl == "compiled":
                for t, lists in dense.items():
                    _compiled_update(*lists, None, *_scalars(lr, b1, b2, eps, wd, t, lists[0][0].device))
                for t, lists in masked.items():
                    _compiled_update(*lists, *_scalars(lr, b1, b2, eps, wd, t, lists[0][0].device))
                continue
            for t, (ps, gs, avgs, sqs) in dense.items():
                bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
                torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_lerp_(avgs, gs, 1 - b1)
                torch._foreach_mul_(sqs, b2)
                torch._foreach_addcmul_(sqs, gs, gs, value=1 - b2)
                denom = torch._foreach_sqrt(sqs)
                torch._foreach_div_(denom, bc2_sqrt)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, avgs, denom, value=-lr / bc1)
            for t, (ps, gs, avgs, sqs, ms) in masked.items():
                bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
                # Every change is a delta multiplied by M (0/1) before it is added: x + 0 is exactly x,
                # so entries outside M keep parameter and moments bit for bit.
                # m += (1-β1)·M·(g - m)
                d = torch._foreach_sub(gs, avgs)
                torch._foreach_mul_(d, ms)
                torch._foreach_add_(avgs, d, alpha=1 - b1)
                # v += (1-β2)·M·(g² - v)
                d = torch._foreach_mul(gs, gs)
                torch._foreach_sub_(d, sqs)
                torch._foreach_mul_(d, ms)
                torch._foreach_add_(sqs, d, alpha=1 - b2)
                # p -= lr/bc1·M·(m/(√v/√bc2 + ε) + wd·bc1·p), i.e. lr·M·(m̂/(√v̂+ε) + wd·p)
                denom = torch._foreach_sqrt(sqs)
                torch._foreach_div_(denom, bc2_sqrt)
                torch._foreach_add_(denom, eps)
                d = torch._foreach_div(avgs, denom)
                torch._foreach_add_(d, ps, alpha=wd * bc1)
                torch._foreach_mul_(d, ms)
                torch._foreach_add_(ps, d, alpha=-lr / bc1)
        return loss

    @torch.no_grad()
    def reset_entries(self, entries: Mapping[str, torch.Tensor]) -> int:
        """Zero both moments at the given entries (name -> bool tensor of the parameter's shape).

        Returns the number of entries reset. Parameters without state yet are skipped.
        """
        by_name = {self._name[id(p)]: p for pg in self.param_groups for p in pg["params"]}
        unknown = [name for name in entries if name not in by_name]
        if unknown:
            raise MaskTargetError(f"reset_entries: {unknown} are not parameters of this optimizer "
                                  f"(it has {len(by_name)}, e.g. {sorted(by_name)[:4]})")
        for name, e in entries.items():
            if e.dtype != torch.bool or e.shape != by_name[name].shape:
                raise MaskError(f"reset_entries: entries of {name!r} must be a bool tensor of the parameter's "
                                f"shape {list(by_name[name].shape)}, got {e.dtype} {list(e.shape)}")
        n = 0
        for name, e in entries.items():
            p = by_name[name]
            if p in self.state and self.state[p]:
                self.state[p]["exp_avg"].masked_fill_(e, 0.0)
                self.state[p]["exp_avg_sq"].masked_fill_(e, 0.0)
                n += int(e.sum())
        return n
