"""The shared training loop (recipes/loop.py) on a model no recipe knows: a recipe of a dozen lines
trains, evaluates with a best-so-far, groups its tasks, checkpoints, resumes to the same state as
an uninterrupted run, and writes results.json last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from maskmtl.config import Masking
from recipes.common import make_generator, seed_everything
from recipes.loop import Evaluation, RunContext, TrainLoop, TrainSpec

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = ["a", "b", "c"]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 16), torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def loss_fn(forward, task, batch):
    x, y = batch
    return (forward(x).squeeze(-1) - y).square().mean()


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["recipe=digits", "train.steps=24", "train.eval_every=6",
                                                       "train.checkpoint_every=5", "train.log_every=3",
                                                       "masking.update_every=4", "masking.grad_batches=1", "scheduler.eta_max=4",
                                                       *overrides])
    with open_dict(cfg):
        cfg.tasks = TASKS
        cfg.targets.include = r"fc\d\.weight"
    return cfg


class Recipe:
    """A recipe on the loop: three regression tasks y = <w_t, x>, evaluated by their test loss."""

    def __init__(self, cfg, out: Path, on_step=None):
        seed_everything(cfg.seed)
        self.ctx = RunContext(out=out, device=torch.device("cpu"), seed=int(cfg.seed), t_start=0.0,
                              logger=OmegaConf.to_container(cfg.logger))
        self.spec = TrainSpec.from_config(cfg.train)
        self.model = Net()
        self.masking = Masking(cfg, self.model, TASKS, make_generator(cfg.seed, 1))
        w = torch.randn(len(TASKS), 5, generator=torch.Generator().manual_seed(7))
        self.gens = {"tasks": make_generator(cfg.seed, 3), "data": make_generator(cfg.seed, 2),
                     "scores": make_generator(cfg.seed, 4)}

        def batch(task, g):
            x = torch.randn(16, 5, generator=g)
            return x, x @ w[task]
        self.test = [batch(t, torch.Generator().manual_seed(100 + t)) for t in range(len(TASKS))]
        self.evaluated = []

        @torch.no_grad()
        def evaluate(step):
            losses = {t: float(loss_fn(self.masking.model.bind(i), i, self.test[i])) for i, t in enumerate(TASKS)}
            self.evaluated.append(step)
            score = -sum(losses.values()) / len(losses)
            return Evaluation({f"eval/{t}/loss": v for t, v in losses.items()}, score, losses)
        warmup = int(cfg.grouping.warmup_steps) if self.masking.needs_grouping else 0
        self.loop = TrainLoop(self.ctx, self.spec, model=self.model, masking=self.masking, loss_fn=loss_fn,
                              batch_for=lambda t: batch(t, self.gens["data"]),
                              score_batches=lambda t: [batch(t, self.gens["scores"])], generators=self.gens,
                              evaluate=evaluate, grouping_at=warmup, dense_until=warmup, on_step=on_step)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loop_trains_evaluates_and_finishes(tmp_path):
    cfg = config()
    r = Recipe(cfg, tmp_path)
    assert r.loop.restore() == 0 and r.loop.resumed_from is None
    before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    r.loop.train()
    assert r.evaluated == [6, 12, 18]  # every eval_every steps, the last step left to the recipe's final evaluation
    logged = rows(tmp_path)
    assert [x["step"] for x in logged if "train/loss" in x] == list(range(3, 25, 3))
    assert all(x["train/lr"] == cfg.train.lr for x in logged if "train/lr" in x)  # no warm-up key: constant lr
    assert [x["step"] for x in logged if "mask/swapped" in x] == [4, 8, 12, 16, 20]  # none at the last step
    assert r.loop.best["step"] in (6, 12, 18) and r.loop.best["mean_success"] == max(
        -sum(x[f"eval/{t}/loss"] for t in TASKS) / 3 for x in logged if "eval/a/loss" in x)
    assert any(not torch.equal(before[n], p) for n, p in r.model.named_parameters())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 24 and ckpt["extra"]["metrics_rows"] == len(logged)
    assert set(ckpt["extra"]) == {"wall_time_s", "best", "updater", "metrics_rows"}
    results = r.loop.finish(cfg, per_task={t: {"loss": 1.0} for t in TASKS}, headline="loss", title="t",
                            table="t", extra={"resumed_from": r.loop.resumed_from})
    assert json.loads((tmp_path / "results.json").read_text())["headline"] == results["headline"]
    assert (tmp_path / "masks.safetensors").exists() and (tmp_path / "curves.png").exists()
    # the mask diagnostics over training: a figure, and their last / mean values in results.json
    assert (tmp_path / "diagnostics.png").exists()
    diag = results["mask_diagnostics"]
    assert diag["updates"] == 5 and diag["steps"] == [4, 8, 12, 16, 20]
    shares = [x["mask/changed_since_init_share"] for x in logged if "mask/changed_since_init_share" in x]
    assert diag["mask/changed_since_init_share"] == {"last": shares[-1], "mean": pytest.approx(sum(shares) / 5)}
    assert 0 < shares[-1] < 1 and "eval/heldout_mse" not in diag  # this recipe logs no held-out loss


def test_no_mask_updates_no_diagnostics(tmp_path):
    cfg = config("masking.update_every=0")
    r = Recipe(cfg, tmp_path)
    r.loop.restore()
    r.loop.train()
    results = r.loop.finish(cfg, per_task={t: {"loss": 1.0} for t in TASKS}, headline="loss", title="t", table="t",
                            extra={})
    assert results["mask_diagnostics"] is None and not (tmp_path / "diagnostics.png").exists()


class Stop(Exception):
    pass


def stop_at(step_to_stop):
    def on_step(step, metrics):
        if step == step_to_stop:
            raise Stop
    return on_step


@pytest.mark.parametrize("overrides", [(), ("grouper=knn", "grouper.n_groups=2", "grouping.warmup_steps=10")],
                         ids=["per-task", "grouped"])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, overrides):
    """Stopped at step 13 (after the checkpoint of step 10), rebuilt from scratch and resumed: the
    same weights, masks, optimizer state and log as a run that never stopped."""
    cfg = config(*overrides)
    whole = Recipe(cfg, tmp_path / "whole")
    whole.loop.restore()
    whole.loop.train()
    first = Recipe(cfg, tmp_path / "stopped", on_step=stop_at(13))
    first.loop.restore()
    with pytest.raises(Stop):
        first.loop.train()
    again = Recipe(cfg, tmp_path / "stopped")
    assert again.loop.restore() == 10 and again.loop.resumed_from == 10
    again.loop.train()
    for n, p in whole.model.state_dict().items():
        assert torch.equal(p, again.model.state_dict()[n]), n
    assert whole.masking.masks.task_to_group == again.masking.masks.task_to_group
    for n in whole.masking.masks.names:
        assert torch.equal(whole.masking.masks[n], again.masking.masks[n]), n
    a, b = whole.loop.optimizer.state_dict()["state"], again.loop.optimizer.state_dict()["state"]
    assert all(torch.equal(a[k][s], b[k][s]) for k in a for s in a[k])

    def strip(xs):
        return [{k: v for k, v in x.items() if not k.startswith("time/")} for x in xs]
    assert strip(rows(tmp_path / "whole")) == strip(rows(tmp_path / "stopped"))
    if overrides:
        assert whole.masking.masks.n_groups == 2 and any("mask/groups" in x for x in rows(tmp_path / "whole"))


def test_train_spec_reads_the_recipes_train_keys():
    for recipe in ("digits", "harmodt", "g_harmodt"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"recipe={recipe}"])
        spec = TrainSpec.from_config(cfg.train)
        assert spec.steps == cfg.train.steps and spec.lr == cfg.train.lr
        assert spec.warmup_steps == OmegaConf.select(cfg, "train.warmup_steps", default=0)
        # the warm-up: linear to train.lr, then constant
        assert spec.lr_at(spec.warmup_steps or 1) == spec.lr and spec.lr_at(10 ** 9) == spec.lr
        if spec.warmup_steps > 1:
            assert spec.lr_at(1) == pytest.approx(spec.lr / spec.warmup_steps)


@pytest.mark.parametrize("overrides", [(), ("grouper=knn", "grouper.n_groups=2", "grouping.warmup_steps=10")],
                         ids=["per-task", "grouped"])
def test_float_cache_group_trains_exactly_as_all(tmp_path, overrides):
    """masking.float_cache=group (one group's float masks, converted when the group changes) gives the
    same weights, masks and log as the default all, through task alternation, mask updates and (grouped)
    the regrouping that replaces the mask buffers; it holds one group's floats where all holds every
    group's."""
    out = {}
    for mode in ("all", "group"):
        r = Recipe(config(f"masking.float_cache={mode}", *overrides), tmp_path / mode)
        assert r.masking.masks.float_cache == mode
        r.loop.restore()
        r.loop.train()
        out[mode] = r
    a, g = out["all"], out["group"]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), g.model.parameters()))
    assert all(torch.equal(a.masking.masks[n], g.masking.masks[n]) for n in a.masking.masks.names)
    strip = lambda rs: [{k: v for k, v in x.items() if not k.startswith("time/")} for x in rs]  # noqa: E731
    assert strip(rows(tmp_path / "all")) == strip(rows(tmp_path / "group"))
    entries = a.masking.masks.numel()
    assert a.masking.masks.float_cache_bytes() == 4 * entries * a.masking.masks.n_groups
    assert g.masking.masks.float_cache_bytes() == 4 * entries


def test_float_cache_refuses_an_unknown_mode(tmp_path):
    from maskmtl.config import ConfigError
    with pytest.raises(ConfigError, match="masking.float_cache='rows': expected one of"):
        Recipe(config("masking.float_cache=rows"), tmp_path)
