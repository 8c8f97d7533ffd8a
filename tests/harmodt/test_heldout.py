"""The held-out action loss of the harmodt recipe (eval.heldout_batches): which segments it reads,
that a run logs it, and that it equals a recomputation from the run's saved model and masks that
shares no code with the recipe's forward or loss."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("metaworld")

from maskmtl import MaskedModel, MaskSet, read_masks_file  # noqa: E402
from maskmtl.config import ConfigError, Masking  # noqa: E402
from maskmtl.outputs import read_metrics  # noqa: E402
from recipes.common import make_generator  # noqa: E402
from recipes.harmodt.evaluate import HELDOUT_BATCH, heldout_batches, heldout_index, heldout_mse  # noqa: E402
from recipes.harmodt.train import example_inputs, export_setup, forward_kwargs, make_loss_fn  # noqa: E402
from recipes.metaworld.make_data import ensure_dataset  # noqa: E402
from recipes.metaworld.sampler import SamplingConfig, SegmentSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["recipe=harmodt", "debug=smoke", "threads=1", "train.steps=12", "masking.update_every=4",
          "train.eval_every=6", "train.checkpoint_every=6"]
KEYS = ["eval/heldout_mse", "eval/heldout_mse_init", "eval/heldout_mse_neighbour"]


def run(*args: str) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "run.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("heldout")
    out = {}
    for method in ("harmodt_f", "prompt_dt"):
        d = base / method
        run(*COMMON, f"method={method}", f"data_root={base / 'data'}", f"hydra.run.dir={d}")
        out[method] = d
    return out


def sampler_of(cfg) -> SegmentSampler:
    return SegmentSampler(ensure_dataset(cfg.data, cfg.data_root, progress=False),
                          SamplingConfig.from_config(cfg.data.get("sampling")))


# ------------------------------------------------------------------------------ the segments

@pytest.mark.slow
def test_segments_are_heldout_fixed_and_read_no_training_stream(runs):
    cfg = OmegaConf.load(runs["harmodt_f"] / ".hydra" / "config.yaml")
    sampler = sampler_of(cfg)
    state = np.random.get_state()[1].copy()
    a, b = heldout_batches(sampler, 3, "cpu"), heldout_batches(sampler, 3, "cpu")
    assert (np.random.get_state()[1] == state).all()  # numpy's global stream untouched
    assert len(a) == len(sampler.tasks) and all(len(t) == 3 for t in a)
    for ta, tb in zip(a, b):  # drawn again: the same segments
        for x, y in zip(ta, tb):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            assert x["states"].shape[0] == HELDOUT_BATCH
    for i, task in enumerate(sampler.tasks):
        held = set(sampler.heldout[task].tolist())
        idx = heldout_index(sampler, i, 500, np.random.default_rng(1))
        assert set(idx.episode.tolist()) <= held and not set(idx.episode.tolist()) & set(sampler.train_episodes(task))
        assert set(idx.prompt_episode.tolist()) <= held
        if sampler.config.prompt_episode == "best" and len(held) > 1:  # the prompt's episode gives no segments
            assert int(sampler.heldout[task][0]) not in set(idx.episode.tolist())
            assert (idx.prompt_episode == sampler.heldout[task][0]).all()
        lengths = sampler._ep_len[sampler._ep_offset[i] + idx.episode]
        assert (idx.start >= 0).all() and (idx.start < lengths).all()
        assert (idx.task == i).all()
    # a task's segments depend on its name, not on its row
    one = SegmentSampler(ensure_dataset(cfg.data, cfg.data_root, tasks=[sampler.tasks[1]], progress=False),
                         sampler.config)
    if one.tasks == [sampler.tasks[1]]:
        solo = heldout_batches(one, 3, "cpu")[0]
        assert all(torch.equal(x["states"], y["states"]) for x, y in zip(solo, a[1]))


# ------------------------------------------------------------------------------ what a run logs

@pytest.mark.slow
def test_run_logs_the_heldout_loss(runs):
    for method, d in runs.items():
        res = json.loads((d / "results.json").read_text())
        rows = [r for r in read_metrics(d / "metrics.jsonl") if "eval/heldout_mse" in r]
        assert [r["step"] for r in rows] == [6, 12]  # the in-loop evaluation and the final one
        tasks = res["tasks"]
        for r in rows:
            assert all(math.isfinite(r[k]) and r[k] > 0 for k in KEYS)
            per = [r[f"eval/{t}/heldout_mse"] for t in tasks]
            assert r["eval/heldout_mse"] == pytest.approx(float(np.mean(per)), rel=1e-12)
        last = rows[-1]
        assert [res["per_task"][t]["heldout_mse"] for t in tasks] == [last[f"eval/{t}/heldout_mse"] for t in tasks]
        assert res["mean"]["heldout_mse"] == pytest.approx(res["heldout"]["mse"], rel=1e-12)
        assert res["heldout"]["mse_init"] == last["eval/heldout_mse_init"]
        assert res["heldout"]["mse_neighbour"] == last["eval/heldout_mse_neighbour"]
        assert res["heldout"]["batches_per_task"] == 4 and res["heldout"]["batch_size"] == HELDOUT_BATCH
        if method == "prompt_dt":  # all-ones masks: the three are one number
            for r in rows:
                assert r["eval/heldout_mse"] == r["eval/heldout_mse_init"] == r["eval/heldout_mse_neighbour"]
        else:  # learned masks moved (updates at 4 and 8), so the current and initial masks differ
            assert rows[-1]["eval/heldout_mse"] != rows[-1]["eval/heldout_mse_init"]


def recompute(model, state, masks: dict, rows_of, batches, use_prompt: bool, task_id: bool) -> list[float]:
    """Task i's held-out MSE with the weights θ ⊙ masks[rows_of(i)] loaded into a plain model."""
    out = []
    for i, task_batches in enumerate(batches):
        g = rows_of(i)
        masked = {k: (v * masks[k][g].to(v.dtype)) if k in masks else v for k, v in state.items()}
        model.load_state_dict(masked)
        model.eval()
        losses = []
        with torch.no_grad():
            for b in task_batches:
                pred = model(**forward_kwargs(b, use_prompt, task_id))
                err = ((pred - b["actions"]) ** 2).mean(-1)
                losses.append(float(err[b["mask"]].mean()))
        out.append(float(np.mean(losses)))
    return out


@pytest.mark.slow
def test_heldout_loss_equals_a_recomputation_from_the_saved_run(runs):
    d = runs["harmodt_f"]
    cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
    res = json.loads((d / "results.json").read_text())
    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)  # the final checkpoint: the evaluated state
    assert ckpt["step"] == cfg.train.steps
    state = ckpt["model"]
    model, _, _ = export_setup(cfg, state)
    masks, tasks, _ = read_masks_file(d / "masks.safetensors")
    assert set(masks) <= set(state)
    sampler = sampler_of(cfg)
    batches = heldout_batches(sampler, int(cfg.eval.heldout_batches), "cpu")
    n = len(tasks)
    use_prompt, task_id = bool(cfg.model.prompt), bool(cfg.model.task_id)
    own = recompute(model, state, masks, lambda i: i, batches, use_prompt, task_id)
    neighbour = recompute(model, state, masks, lambda i: (i + 1) % n, batches, use_prompt, task_id)
    assert own == pytest.approx([res["per_task"][t]["heldout_mse"] for t in tasks], rel=1e-5)
    assert float(np.mean(neighbour)) == pytest.approx(res["heldout"]["mse_neighbour"], rel=1e-5)
    # the initial masks: regenerated from the seed, they are the ones the checkpoint tracked
    fresh, _, _ = export_setup(cfg, state)
    masking = Masking(cfg, fresh, tasks, make_generator(cfg.seed, 1),
                      example_inputs=example_inputs(sampler, dict(cfg.model), "cpu"))
    tracked = ckpt["extra"]["updater"]["initial"]
    assert all(torch.equal(masking.masks[k], tracked[k]) for k in tracked)
    init = recompute(model, state, {k: masking.masks[k] for k in masking.masks.names}, lambda i: i, batches,
                     use_prompt, task_id)
    assert float(np.mean(init)) == pytest.approx(res["heldout"]["mse_init"], rel=1e-5)


@pytest.mark.slow
def test_heldout_loss_follows_the_masks(runs):
    """(a) under other masks is another number; under the same masks the same one."""
    d = runs["harmodt_f"]
    cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
    state = torch.load(d / "checkpoint.pt", weights_only=True)["model"]
    model, _, _ = export_setup(cfg, state)
    masks, tasks, t2g = read_masks_file(d / "masks.safetensors")
    set_a = MaskSet(masks, tasks, t2g)
    flipped = {k: v.clone() for k, v in masks.items()}
    name = next(iter(flipped))
    flipped[name][0].view(-1)[:50] ^= True  # task 0's mask changes in 50 entries, task 1's not
    set_b = MaskSet(flipped, tasks, t2g)
    batches = heldout_batches(sampler_of(cfg), 2, "cpu")
    loss_fn = make_loss_fn(bool(cfg.model.prompt), bool(cfg.model.task_id))

    def own(mm):
        return {"own": lambda i: (lambda *a, **k: mm.forward_group(mm.masks.group_of(i), *a, **k))}
    a = heldout_mse(model, loss_fn, batches, own(MaskedModel(model, set_a)))["own"]
    a2 = heldout_mse(model, loss_fn, batches, own(MaskedModel(model, set_a)))["own"]
    b = heldout_mse(model, loss_fn, batches, own(MaskedModel(model, set_b)))["own"]
    assert a == a2 and a[0] != b[0] and a[1] == b[1]
    assert model.training  # heldout_mse puts the model back in the mode it found


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides,message", [
    (["eval.heldout_batches=-1"], "eval.heldout_batches=-1"),
    (["eval.heldout_batches=abc"], "eval.heldout_batches='abc'"),
    (["eval.heldout_batches=2.5"], "eval.heldout_batches=2.5"),
    (["eval.heldout_batches=true"], "eval.heldout_batches=True"),
    (["data.sampling.heldout_episodes=0", "data.prompt_demos=0", "data.sampling.prompt_length=0",
      "model.prompt=false"],
     "eval.heldout_batches=4"),
])
def test_bad_heldout_config_is_refused(tmp_path, overrides, message):
    from test_hardening import prepared

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        prepared(["recipe=harmodt", "debug=smoke", *overrides], tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_heldout_off_is_accepted(tmp_path):
    from test_hardening import prepared

    _, cfg = prepared(["recipe=harmodt", "debug=smoke", "eval.heldout_batches=0", "dry_run=true"], tmp_path / "r")
    assert cfg.eval.heldout_batches == 0


@pytest.mark.slow
def test_report_reads_the_heldout_loss(runs, tmp_path):
    """tools/report.py --metric heldout_mse: results.json's mean (from per_task) per run, and the
    paired difference against a baseline arm."""
    import csv

    sweep = next(iter(runs.values())).parent
    out = tmp_path / "reports"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(sweep), "--rows", "method",
                        "--metric", "heldout_mse", "--baseline", "method=prompt_dt", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(open(next(out.glob("*.csv")))))
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == set(runs)
    for method, d in runs.items():
        res = json.loads((d / "results.json").read_text())
        assert by_method[method]["metric"] == "heldout_mse"
        assert float(by_method[method]["mean"]) == pytest.approx(res["heldout"]["mse"], rel=1e-9)
