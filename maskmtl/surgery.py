"""Gradient surgery over the tasks of one step (spec §9: MTDT + PCGrad, MTDT + CAGrad).

Input: the flattened per-task gradients of one step, ``grads`` of shape ``[N, P]`` (N tasks, P
parameters). Both methods return a direction that is a linear combination of the rows,
``d = Σ_i a_i g_i``, and both only need the Gram matrix ``G = grads · gradsᵀ`` ([N, N], float64)
to find the coefficients ``a``. So the surgery itself costs one ``[N, P] × [P, N]`` product plus
O(N³) work on G, and needs no second ``[N, P]`` buffer.

PCGrad (Yu et al. 2020, "Gradient surgery for multi-task learning"), for each task i, with the
other tasks visited in a random order of their own:

    g_i' ← g_i;  for j in order_i:  if g_i'·g_j < 0:  g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²) g_j
    d = Σ_i g_i'                      (reduction="sum", the paper's Algorithm 1)
    d = (1/N) Σ_i g_i'                (reduction="mean": without conflicts, the mean gradient)

g_j is always the original gradient (not its projected version). Each g_i' stays in the span of
the originals, so the loop runs on the coefficient matrix C (g_i' = Σ_k C_ik g_k, C = I at the
start): g_i'·g_j = (C G)_ij, and a projection subtracts from C_ij.

CAGrad (Liu et al. 2021, "Conflict-averse gradient descent for multi-task learning"), with
g_0 = (1/N) Σ_i g_i the mean gradient and c ∈ [0, 1):

    max_d min_i g_i·d   subject to  ‖d − g_0‖ ≤ c‖g_0‖
    dual:  w* = argmin_{w ∈ simplex} F(w),  F(w) = g_w·g_0 + c‖g_0‖ ‖g_w‖,  g_w = Σ_i w_i g_i
    d = g_0 + (c‖g_0‖ / ‖g_w*‖) g_w*

This is the paper's φ = c²‖g_0‖² (the radius of the ball is c‖g_0‖, as in the authors' code; no
final rescaling of d). c = 0 gives d = g_0. F is convex on the simplex; in terms of G,
F(w) = wᵀG b + c √(bᵀG b) √(wᵀG w) with b = 1/N, and F's minimiser does not change when G is
multiplied by a positive number, so G is first divided by its mean diagonal (per-task gradients
of a network are ~1e-3, and an unscaled G would stop the solver on its absolute tolerances at
once). The N-dimensional problem is solved by SLSQP (scipy) from the uniform w with the analytic
gradient; the returned w is clipped to ≥ 0 and renormalised, and the uniform w and the N vertices
are kept as candidates, so a failed solver run can never return a point worse than these.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

SURGERY_METHODS = ("mean", "pcgrad", "cagrad")
REDUCTIONS = ("sum", "mean")


def gram(grads: torch.Tensor) -> torch.Tensor:
    """``G_ij = g_i·g_j`` of ``grads`` [N, P], returned as float64 [N, N] on the CPU."""
    if grads.dim() != 2:
        raise ValueError(f"grads must be [N, P], got shape {tuple(grads.shape)}")
    return (grads @ grads.T).double().cpu()


def random_orders(n: int, generator: torch.Generator) -> torch.Tensor:
    """For each task i, the other N−1 tasks in a random order: long [N, N−1]. One draw of
    ``N × N`` uniforms from ``generator`` per call (so a checkpointed generator replays it)."""
    keys = torch.rand((n, n), generator=generator, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # task i itself sorts last and is cut off
    return keys.argsort(dim=1)[:, : n - 1]


def pcgrad_weights(G: torch.Tensor, orders: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """PCGrad's coefficients ``a`` [N] (d = Σ_i a_i g_i) from the Gram matrix ``G`` [N, N] and the
    visiting orders [N, N−1] (row i: the tasks that g_i is projected against, in turn)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n = G.shape[0]
    if orders.shape != (n, max(n - 1, 0)):
        raise ValueError(f"orders must be [{n}, {n - 1}], got shape {tuple(orders.shape)}")
    G = G.double()
    C = torch.eye(n, dtype=torch.float64)  # row i: g_i' in the basis of the original g_k
    rows = torch.arange(n)
    sq = G.diagonal()
    for k in range(n - 1):
        j = orders[:, k]  # [N]: the task each row is projected against at this turn
        dot = (C * G[:, j].T).sum(dim=1)  # g_i'·g_{j_i} = Σ_k C_ik G_{k j_i}
        conflict = (dot < 0) & (sq[j] > 0)
        coef = torch.where(conflict, dot / sq[j].clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        C[rows, j] -= coef
    a = C.sum(dim=0)
    return a / n if reduction == "mean" else a


def cagrad_weights(G: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """CAGrad's coefficients ``a`` [N] (d = Σ_i a_i g_i = g_0 + λ g_w) from ``G`` [N, N]."""
    if not (isinstance(c, (int, float)) and 0.0 <= c < 1.0):
        raise ValueError(f"c must be a number in [0, 1), got {c!r}")
    n = G.shape[0]
    b = torch.full((n,), 1.0 / n, dtype=torch.float64)
    scale = float(G.double().diagonal().mean())
    if c == 0.0 or n == 1 or not scale > 0.0:  # d = g_0 (also when every gradient is zero)
        return b
    A = (G.double() / scale).numpy()
    bv = b.numpy()
    g0_sq = float(bv @ A @ bv)  # ‖g_0‖² (scaled)
    if not g0_sq > 1e-20:  # g_0 = 0 up to rounding: nothing to correct, d = g_0 = 0
        return b
    k = c * math.sqrt(g0_sq)
    w = _min_over_simplex(A, bv, k)
    gw_norm = math.sqrt(max(float(w @ A @ w), 0.0))
    if gw_norm <= 1e-10 * math.sqrt(g0_sq):  # degenerate g_w: no correction can be scaled by 1/‖g_w‖
        return b
    return b + (k / gw_norm) * torch.from_numpy(w)


def _min_over_simplex(A, b, k: float):
    """argmin over the simplex of F(w) = wᵀA b + k √(wᵀA w) (A symmetric PSD, scaled to O(1))."""
    import numpy as np
    from scipy.optimize import minimize

    n = len(b)
    Ab = A @ b
    eps = 1e-18  # keeps √ differentiable where g_w = 0

    def f(w):
        return float(w @ Ab + k * math.sqrt(max(float(w @ A @ w), 0.0) + eps))

    def grad(w):
        return Ab + k * (A @ w) / math.sqrt(max(float(w @ A @ w), 0.0) + eps)

    candidates = [b.copy()] + [np.eye(n)[i] for i in range(n)]
    res = minimize(f, b.copy(), jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                   constraints=[{"type": "eq", "fun": lambda w: float(w.sum() - 1.0), "jac": lambda w: np.ones(n)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(np.asarray(res.x, dtype=np.float64), 0.0, None)
    if np.isfinite(w).all() and w.sum() > 0:
        candidates.insert(0, w / w.sum())
    return min(candidates, key=f)


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None, *, reduction: str = "sum",
           orders: torch.Tensor | None = None) -> torch.Tensor:
    """PCGrad direction [P] of ``grads`` [N, P]; orders drawn from ``generator`` unless given."""
    n = grads.shape[0]
    if orders is None:
        if generator is None:
            raise ValueError("pcgrad needs a generator (for the random orders) or explicit orders")
        orders = random_orders(n, generator)
    a = pcgrad_weights(gram(grads), orders, reduction)
    return a.to(grads.dtype).to(grads.device) @ grads


def cagrad(grads: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """CAGrad direction [P] of ``grads`` [N, P]."""
    a = cagrad_weights(gram(grads), c)
    return a.to(grads.dtype).to(grads.device) @ grads


class TaskGradients:
    """Per-task gradients of one step in one flat buffer, one backward pass per task.

    Each task's loss is built, differentiated with ``torch.autograd.grad`` and its graph freed
    before the next task's loss is built, so at most one task's graph is alive at a time. Memory:
    the buffer holds N × P floats (N tasks of the step, P trainable parameters; e.g. 10 × 1.3 M
    float32 = 52 MB, 50 tasks = 260 MB), kept between steps, besides one graph's activations.

    Args:
        params: the parameters to differentiate (in a fixed order), e.g. ``model.parameters()``.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no parameter requires grad")
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self._buf: torch.Tensor | None = None

    def compute(self, losses: Sequence[Callable[[], torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Run ``losses[i]()`` and its backward for each i.

        Returns ``grads`` [N, P] (a view of the reused buffer: valid until the next call), the
        detached losses [N], and for each parameter whether any task's loss used it (parameters no
        loss reaches keep ``.grad = None`` in ``write``, as after a plain backward).
        """
        n = len(losses)
        if n < 1:
            raise ValueError("at least one task loss is required")
        p0 = self.params[0]
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = torch.empty((n, self.numel), dtype=p0.dtype, device=p0.device)
        grads = self._buf[:n]
        values = torch.empty(n, dtype=torch.float64)
        used = [False] * len(self.params)
        for i, make_loss in enumerate(losses):
            loss = make_loss()
            if loss.dim() != 0:
                raise ValueError(f"task loss must be a scalar, got shape {tuple(loss.shape)}")
            parts = torch.autograd.grad(loss, self.params, allow_unused=True)  # frees this task's graph
            values[i] = float(loss.detach())
            for k, (seg, g) in enumerate(zip(grads[i].split(self.sizes), parts)):
                if g is None:
                    seg.zero_()
                else:
                    seg.copy_(g.reshape(-1))
                    used[k] = True
        return grads, values, used

    def write(self, direction: torch.Tensor, used: Sequence[bool]) -> None:
        """Set each parameter's ``.grad`` to its slice of ``direction`` [P] (``None`` if unused)."""
        for p, seg, u in zip(self.params, direction.split(self.sizes), used):
            p.grad = seg.view_as(p).clone() if u else None


class GradientSurgery:
    """Combines the per-task gradients of one step into the ``.grad`` of the parameters.

    Args:
        params: the parameters (all trainable ones of the model).
        method: ``"mean"`` (plain mean of the task gradients), ``"pcgrad"`` or ``"cagrad"``.
        c: CAGrad's radius c ∈ [0, 1) (default 0.5, the default of the authors' code).
        reduction: PCGrad's ``"sum"`` (the paper) or ``"mean"`` (the scale of the mean gradient,
            which keeps gradient clipping comparable with a one-task step).
        generator: PCGrad's random orders; checkpoint it for an exact resume.
    """

    def __init__(self, params: Sequence[torch.Tensor], method: str, *, c: float = 0.5, reduction: str = "mean",
                 generator: torch.Generator | None = None):
        if method not in SURGERY_METHODS:
            raise ValueError(f"method must be one of {SURGERY_METHODS}, got {method!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not (isinstance(c, (int, float)) and 0.0 <= c < 1.0):
            raise ValueError(f"c must be a number in [0, 1), got {c!r}")
        if method == "pcgrad" and generator is None:
            raise ValueError("pcgrad needs a generator for its random orders")
        self.method, self.c, self.reduction, self.generator = method, float(c), reduction, generator
        self.task_grads = TaskGradients(params)
        self.last: dict[str, float] = {}

    def weights(self, G: torch.Tensor) -> torch.Tensor:
        """The coefficients ``a`` [N] of the combined direction for Gram matrix ``G``."""
        n = G.shape[0]
        if self.method == "pcgrad":
            return pcgrad_weights(G, random_orders(n, self.generator), self.reduction)
        if self.method == "cagrad":
            return cagrad_weights(G, self.c)
        return torch.full((n,), 1.0 / n, dtype=torch.float64)

    def backward(self, losses: Sequence[Callable[[], torch.Tensor]]) -> torch.Tensor:
        """One backward per task loss, then ``.grad ← Σ_i a_i g_i``. Returns the mean loss
        (a detached scalar tensor). ``self.last`` holds ``train/conflict_pairs``: the fraction of
        task pairs whose gradients have a negative dot product."""
        grads, values, used = self.task_grads.compute(losses)
        G = gram(grads)
        a = self.weights(G)
        self.task_grads.write(a.to(grads.dtype).to(grads.device) @ grads, used)
        n = G.shape[0]
        pairs = n * (n - 1) / 2
        neg = float(((G < 0).sum() / 2)) if pairs else 0.0
        self.last = {"train/conflict_pairs": neg / pairs if pairs else 0.0}
        return values.mean().to(torch.float32)
