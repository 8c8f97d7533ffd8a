"""How many batches make the mask-update scores stable? (``python tools/bench.py score-stability``)

After a short training run of the digits recipe, two independent gradient estimates are taken
with n batches each; the benchmark reports how much the entries each would drop (the α lowest
harmony scores among active entries) and recover (the α highest recovery scores among inactive
entries) agree (Jaccard overlap, 1 = identical decisions), for several n.
"""

from __future__ import annotations

import time

import torch

from maskmtl import ERKInitializer, FisherScorer, MaskedAdamW, MaskedModel, MaskSet, estimate_gradients, select_targets
from recipes.digits.task import DigitsTasks, MultiTaskMLP
from recipes.digits.train import loss_fn


def _chosen(scores, masks, alpha, active: bool):
    names = list(masks)
    out = []
    for g in range(next(iter(masks.values())).shape[0]):
        m = torch.cat([masks[n][g].flatten() for n in names])
        s = torch.cat([scores[n][g].flatten() for n in names])
        s = s.masked_fill(~m, float("inf")) if active else s.masked_fill(m, float("-inf"))
        out.append(set(torch.topk(s, alpha, largest=not active).indices.tolist()))
    return out


def _jaccard(a, b):
    return sum(len(x & y) / len(x | y) for x, y in zip(a, b)) / len(a)


def score_stability(batches=(1, 2, 4, 8, 16), alpha: int = 100, batch_size: int = 32, train_steps: int = 600,
                    trials: int = 3, seed: int = 0) -> dict:
    tasks = ["digit", "reverse", "shift3", "shift7"]
    torch.manual_seed(seed)
    data = DigitsTasks(tasks, 0.25, seed)
    model = MultiTaskMLP(64, len(tasks), 256, 3)
    targets = select_targets(model, r"(inp|body\.\d+|head)\.weight")
    masks = MaskSet(ERKInitializer(0.8).init_masks({t.name: t.shape for t in targets}, len(tasks),
                                                   torch.Generator().manual_seed(seed)), tasks)
    mm, opt = MaskedModel(model, masks), MaskedAdamW(model.named_parameters(), masks, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(train_steps):  # scores of a trained model, not of the initialisation
        t = step % len(tasks)
        opt.zero_grad()
        loss_fn(mm.bind(t), t, data.batch(t, batch_size, g)).backward()
        opt.step(group=t)
    scorer = FisherScorer()
    params = {n: p.detach() for n, p in model.named_parameters() if n in masks.names}
    cur = masks.as_dict()
    rows = {}
    for n in batches:
        drop_j, grow_j, secs = [], [], []
        for trial in range(trials):
            picks = []
            for rep in range(2):
                gen = torch.Generator().manual_seed(10_000 * (trial + 1) + 100 * rep + n)
                t0 = time.perf_counter()
                gr = estimate_gradients(model, masks, loss_fn,
                                        lambda i: [data.batch(i, batch_size, gen) for _ in range(n)])
                secs.append(time.perf_counter() - t0)
                picks.append((_chosen(scorer.drop_scores(gr, params, cur), cur, alpha, True),
                              _chosen(scorer.grow_scores(gr), cur, alpha, False)))
            drop_j.append(_jaccard(picks[0][0], picks[1][0]))
            grow_j.append(_jaccard(picks[0][1], picks[1][1]))
        rows[str(n)] = {"drop_overlap": sum(drop_j) / trials, "recover_overlap": sum(grow_j) / trials,
                        "estimate_s": sum(secs) / len(secs)}
    return {"alpha": alpha, "batch_size": batch_size, "tasks": len(tasks), "by_batches": rows}
