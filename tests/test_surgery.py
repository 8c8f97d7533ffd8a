"""Gradient surgery (maskmtl.surgery): golden numbers worked by hand, properties, and the
per-task gradient buffer against plain backward passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskmtl.surgery import (GradientSurgery, TaskGradients, cagrad, cagrad_weights, gram, pcgrad, pcgrad_weights,
                             random_orders)

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- PCGrad, golden

def test_pcgrad_two_conflicting_tasks():
    # g1 = (1, 0), g2 = (-1, 1): g1·g2 = -1 < 0, ‖g1‖² = 1, ‖g2‖² = 2
    #   g1' = g1 - (-1/2) g2 = (1, 0) + (-0.5, 0.5) = (0.5, 0.5)
    #   g2' = g2 - (-1/1) g1 = (-1, 1) + (1, 0)     = (0, 1)
    #   sum = (0.5, 1.5), mean = (0.25, 0.75)  (two tasks: the order cannot matter)
    g = t([1, 0], [-1, 1])
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(pcgrad(g, gen), torch.tensor([0.5, 1.5], dtype=F64))
    torch.testing.assert_close(pcgrad(g, gen, reduction="mean"), torch.tensor([0.25, 0.75], dtype=F64))
    # after projection neither conflicts with the other's original gradient
    assert float(torch.tensor([0.5, 0.5], dtype=F64) @ g[1]) >= 0 and float(torch.tensor([0.0, 1.0], dtype=F64) @ g[0]) >= 0


# Three tasks where the order matters: g1 = (1, 0), g2 = (-1, 1), g3 = (0, -1).
#   Gram: g1·g2 = -1, g1·g3 = 0, g2·g3 = -1; ‖g1‖² = 1, ‖g2‖² = 2, ‖g3‖² = 1.
#   task 1, order (2, 3): ·g2 = -1 → (0.5, 0.5); ·g3 = -0.5 → (0.5, 0.5) + 0.5 (0, -1) = (0.5, 0)
#           order (3, 2): ·g3 = 0, unchanged;    ·g2 = -1 → (0.5, 0.5)
#   task 2, order (1, 3): ·g1 = -1 → (0, 1);      ·g3 = -1 → (0, 1) + (0, -1) = (0, 0)
#           order (3, 1): ·g3 = -1 → (-1, 0);     ·g1 = -1 → (-1, 0) + (1, 0) = (0, 0)
#   task 3, order (1, 2): ·g1 = 0, unchanged;    ·g2 = -1 → (0, -1) + 0.5 (-1, 1) = (-0.5, -0.5)
#           order (2, 1): ·g2 = -1 → (-0.5, -0.5); ·g1 = -0.5 → + 0.5 (1, 0) = (0, -0.5)
THREE = t([1, 0], [-1, 1], [0, -1])
FORWARD = torch.tensor([[1, 2], [0, 2], [0, 1]])  # 0-based: each task visits the others in index order
BACKWARD = torch.tensor([[2, 1], [2, 0], [1, 0]])


def test_pcgrad_three_tasks_order_matters():
    # forward orders: (0.5, 0) + (0, 0) + (-0.5, -0.5) = (0, -0.5)
    torch.testing.assert_close(pcgrad(THREE, orders=FORWARD), torch.tensor([0.0, -0.5], dtype=F64))
    # backward orders: (0.5, 0.5) + (0, 0) + (0, -0.5) = (0.5, 0)
    torch.testing.assert_close(pcgrad(THREE, orders=BACKWARD), torch.tensor([0.5, 0.0], dtype=F64))
    # the same from the coefficients (g1'' = g1 + 0.5 g2 + 0.5 g3 = (0.5, 0), and so on): d = a·g
    a = pcgrad_weights(gram(THREE), FORWARD)
    torch.testing.assert_close(a @ THREE, torch.tensor([0.0, -0.5], dtype=F64))


def test_pcgrad_seeded_orders_reproduce_and_vary():
    # task 1 gives (0.5, 0) or (0.5, 0.5), task 2 (0, 0), task 3 (-0.5, -0.5) or (0, -0.5)
    possible = {(0.0, -0.5), (0.5, -0.5), (0.0, 0.0), (0.5, 0.0)}
    seen = set()
    for seed in range(24):
        d1 = pcgrad(THREE, torch.Generator().manual_seed(seed))
        d2 = pcgrad(THREE, torch.Generator().manual_seed(seed))
        assert torch.equal(d1, d2)
        key = tuple(round(float(x), 9) + 0.0 for x in d1)
        assert key in possible
        seen.add(key)
    assert len(seen) >= 3  # the orders really are random


def test_random_orders_are_permutations_of_the_others():
    o = random_orders(7, torch.Generator().manual_seed(3))
    assert o.shape == (7, 6)
    for i in range(7):
        assert sorted(o[i].tolist()) == [k for k in range(7) if k != i]


def test_pcgrad_without_conflict_is_the_plain_sum_and_mean():
    g = torch.rand(5, 40, generator=torch.Generator().manual_seed(1), dtype=F64)  # all dot products > 0
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(pcgrad(g, gen), g.sum(0))
    torch.testing.assert_close(pcgrad(g, gen, reduction="mean"), g.mean(0))


def test_pcgrad_two_tasks_projected_gradients_do_not_conflict():
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        g = torch.randn(2, 6, generator=gen, dtype=F64)
        o = torch.tensor([[1], [0]])
        a0 = pcgrad_weights(gram(g[[0, 1]]), o)  # sum of both projected
        g0p = g[0] - min(float(g[0] @ g[1]), 0.0) / float(g[1] @ g[1]) * g[1]
        g1p = g[1] - min(float(g[1] @ g[0]), 0.0) / float(g[0] @ g[0]) * g[0]
        torch.testing.assert_close(a0 @ g, g0p + g1p)
        assert float(g0p @ g[1]) >= -1e-12 and float(g1p @ g[0]) >= -1e-12


# ---------------------------------------------------------------- CAGrad, golden

def test_cagrad_orthogonal_tasks():
    # g1 = (1, 0), g2 = (0, 1): g0 = (0.5, 0.5), ‖g0‖ = 1/√2. g_w·g0 = 0.5 for every w on the
    # simplex, so F is smallest where ‖g_w‖ is: w = (0.5, 0.5), g_w = g0.
    # d = g0 + c‖g0‖/‖g0‖ g0 = (1 + c) g0 = (0.75, 0.75) for c = 0.5
    torch.testing.assert_close(cagrad(t([1, 0], [0, 1]), 0.5), torch.tensor([0.75, 0.75], dtype=F64))


def test_cagrad_conflicting_tasks():
    # g1 = (3, 0), g2 = (-1, 2): g0 = (1, 1), ‖g0‖ = √2, c = 0.5 → radius k = c‖g0‖ = 1/√2.
    # w = (s, 1-s): g_w = (4s - 1, 2 - 2s), g_w·g0 = 2s + 1, ‖g_w‖² = 20s² - 16s + 5.
    # F'(s) = 2 + k (20s - 8)/‖g_w‖ = 0  ⇒  k²(8 - 20s)² = 4‖g_w‖² (with s < 0.4)
    #   ⇒ 120s² - 96s + 12 = 0 ⇒ 10s² - 8s + 1 = 0 ⇒ s = (4 - √6)/10 ≈ 0.155051
    # ‖g_w‖² = 3, g_w = (0.6 - 0.4√6, 1.2 + 0.2√6), λ = k/‖g_w‖ = 1/√6
    # d = g0 + g_w/√6 = (0.6 + 0.1√6, 1.2 + 0.2√6) ≈ (0.844949, 1.689898)
    # check: d·g1 = d·g2 = 1.8 + 0.3√6 ≈ 2.5348 (both tasks gain equally; g0 gave 3 and 1),
    #        ‖d - g0‖ = √(0.024041 + 0.475959) = √0.5 = c‖g0‖ (on the ball's boundary)
    r6 = math.sqrt(6)
    g = t([3, 0], [-1, 2])
    d = cagrad(g, 0.5)
    torch.testing.assert_close(d, torch.tensor([0.6 + 0.1 * r6, 1.2 + 0.2 * r6], dtype=F64), atol=1e-6, rtol=0)
    s = (4 - r6) / 10
    lam = 1 / r6
    torch.testing.assert_close(cagrad_weights(gram(g), 0.5), torch.tensor([0.5 + lam * s, 0.5 + lam * (1 - s)], dtype=F64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(d @ g[0], d @ g[1], atol=1e-6, rtol=0)
    # the minimiser does not depend on the gradients' scale (G is normalised before solving)
    torch.testing.assert_close(cagrad(g * 1e-5, 0.5) / 1e-5, d, atol=1e-6, rtol=0)


def test_cagrad_opposite_tasks_give_zero():
    # g1 = -g2: g0 = 0, the ball has radius 0, d = g0 = 0
    torch.testing.assert_close(cagrad(t([1, 2], [-1, -2]), 0.5), torch.zeros(2, dtype=F64))


def test_cagrad_with_c_zero_is_the_mean():
    g = torch.randn(6, 30, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(cagrad(g, 0.0), g.mean(0))


def test_cagrad_solves_the_dual_and_respects_the_ball():
    gen = torch.Generator().manual_seed(7)
    for trial in range(20):
        n = 3
        g = torch.randn(n, 5, generator=gen, dtype=F64)
        c = 0.5
        d = cagrad(g, c)
        g0 = g.mean(0)
        # constraint of the primal: ‖d - g0‖ ≤ c‖g0‖ (equality unless g_w = 0)
        assert float((d - g0).norm()) <= c * float(g0.norm()) + 1e-6
        # the worst task is no worse off than under the mean gradient (max-min objective)
        assert float((g @ d).min()) >= float((g @ g0).min()) - 1e-6
        # the dual minimum matches a fine grid search over the simplex
        G = gram(g)
        k = c * float(g0.norm())

        def F(w):
            w = torch.tensor(w, dtype=F64)
            return float(w @ G @ torch.full((n,), 1 / n, dtype=F64)) + k * math.sqrt(max(float(w @ G @ w), 0.0))

        a = cagrad_weights(G, c)
        gw = a - 1 / n  # = λ w
        w = (gw / gw.sum()).tolist() if float(gw.sum()) > 0 else [1 / n] * n
        steps = 60
        grid = min(F([i / steps, j / steps, 1 - (i + j) / steps]) for i in range(steps + 1) for j in range(steps + 1 - i))
        assert F(w) <= grid + 1e-9, trial


def test_cagrad_rejects_bad_c():
    with pytest.raises(ValueError, match="c must be"):
        cagrad(t([1, 0], [0, 1]), 1.0)
    with pytest.raises(ValueError, match="c must be"):
        cagrad(t([1, 0], [0, 1]), -0.1)


# ---------------------------------------------------------------- per-task gradients and .grad

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)
        self.unused = nn.Linear(2, 2)  # no loss reaches it

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _task_losses(net, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(5, 4, generator=g), torch.randn(5, 1, generator=g)) for _ in range(n)]
    return [lambda x=x, y=y: (net(x) - y).square().mean() for x, y in data]


def test_task_gradients_equal_separate_backward_passes():
    torch.manual_seed(0)
    net = _Net()
    tg = TaskGradients(list(net.parameters()))
    losses = _task_losses(net)
    grads, values, used = tg.compute(losses)
    assert grads.shape == (3, tg.numel) and used == [True, True, True, True, False, False]
    for i, f in enumerate(losses):
        net.zero_grad(set_to_none=True)
        loss = f()
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in net.parameters()])
        torch.testing.assert_close(grads[i], flat)
        assert values[i] == pytest.approx(loss.item())


@pytest.mark.parametrize("method", ["mean", "pcgrad", "cagrad"])
def test_surgery_writes_the_combined_gradient(method):
    torch.manual_seed(0)
    net = _Net()
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(4)
    s = GradientSurgery(params, method, c=0.5, reduction="mean", generator=gen)
    losses = _task_losses(net, seed=1)
    ref_grads, values, _ = TaskGradients(params).compute(losses)
    ref_grads = ref_grads.clone()
    if method == "pcgrad":  # the same orders as the surgery draws next
        expect = pcgrad(ref_grads, torch.Generator().manual_seed(4), reduction="mean")
    elif method == "cagrad":
        expect = cagrad(ref_grads, 0.5)
    else:
        expect = ref_grads.mean(0)
    mean_loss = s.backward(losses)
    assert float(mean_loss) == pytest.approx(float(values.mean()))
    got = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    n_used = sum(p.numel() for p in params[:4])
    torch.testing.assert_close(got, expect[:n_used])
    assert net.unused.weight.grad is None and net.unused.bias.grad is None  # as after a plain backward
    assert 0.0 <= s.last["train/conflict_pairs"] <= 1.0


def test_surgery_mean_equals_backward_of_the_mean_loss():
    torch.manual_seed(0)
    net = _Net()
    losses = _task_losses(net, seed=2)
    GradientSurgery(list(net.parameters()), "mean").backward(losses)
    got = [p.grad.clone() for p in list(net.parameters())[:4]]
    net.zero_grad(set_to_none=True)
    (sum(f() for f in losses) / len(losses)).backward()
    for g, p in zip(got, list(net.parameters())[:4]):
        torch.testing.assert_close(g, p.grad)


def test_surgery_rejects_bad_arguments():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="method"):
        GradientSurgery(p, "mgda")
    with pytest.raises(ValueError, match="generator"):
        GradientSurgery(p, "pcgrad")
    with pytest.raises(ValueError, match="reduction"):
        GradientSurgery(p, "mean", reduction="max")


# ---------------------------------------------------------------- the recipes' multi-task step

def _multi(method="pcgrad", n=4, k=4, mode="round_robin", seed=0, net=None):
    from recipes.common import MultiTaskStep

    net = net or _Net()
    gen = torch.Generator().manual_seed(seed) if method == "pcgrad" else None
    return MultiTaskStep(GradientSurgery(list(net.parameters()), method, generator=gen), n, k, mode)


def test_multi_task_step_task_choice():
    rr = _multi(n=5, k=2)
    assert [rr.tasks(s, None) for s in (1, 2, 3)] == [[0, 1], [2, 3], [0, 4]]  # blocks of 2, cycling
    assert _multi(n=5, k=5).tasks(7, None) == [0, 1, 2, 3, 4]
    uni = _multi(n=6, k=3, mode="uniform")
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    draws = [uni.tasks(s, g1) for s in range(1, 9)]
    assert draws == [uni.tasks(s, g2) for s in range(1, 9)]
    assert all(len(d) == 3 and len(set(d)) == 3 and set(d) <= set(range(6)) for d in draws)
    assert len({tuple(d) for d in draws}) > 1


def test_pcgrad_training_resumes_exactly_from_its_generator_state():
    # 4 tasks whose gradients conflict, so PCGrad's orders change the update; an SGD run of 12
    # steps vs 6 steps + restore (model, generator state) + 6 steps: identical parameters.
    from maskmtl.checkpoint import rng_state, set_rng_state

    def train(net, multi, steps, start=0):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(start + 1, start + steps + 1):
            opt.zero_grad(set_to_none=True)
            multi.backward(step, None, lambda t: (net(X[t]) - Y[t]).square().mean())
            opt.step()

    g = torch.Generator().manual_seed(9)
    X = torch.randn(4, 6, 4, generator=g)
    Y = torch.stack([torch.randn(6, 1, generator=g) * (1 if t % 2 else -1) for t in range(4)])
    torch.manual_seed(0)
    a = _Net()
    b = _Net()
    b.load_state_dict(a.state_dict())
    c = _Net()
    c.load_state_dict(a.state_dict())
    ma, mb = _multi(net=a), _multi(net=b)
    train(a, ma, 12)
    train(b, mb, 6)
    state = rng_state(mb.generators)
    mc = _multi(net=c, seed=123)  # a fresh run with another stream, then restored
    c.load_state_dict(b.state_dict())
    set_rng_state(state, mc.generators)
    train(c, mc, 6, start=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    # and the orders matter here: without restoring the generator the result differs
    d = _Net()
    d.load_state_dict(b.state_dict())
    train(d, _multi(net=d, seed=123), 6, start=6)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))
