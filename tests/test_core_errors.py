"""Bad inputs to the core API, one table row each: the exception type and the words its message
must hold (the argument, key, target or file at fault, and what was expected).

Below the table: the file-mode and stale-temporary-file behaviour of ``atomic_write_bytes`` and
golden cases for ranking float64 scores without rounding them to float32.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from maskmtl import (AgreementScorer, ConstantScheduler, CosineScheduler, ERKInitializer, FisherScorer, KNNGrouper,
                     MaskedAdamW, MaskedModel, MaskError, MaskIndexError, MaskSet, MaskTargetError, MaskUpdateError,
                     MaskUpdater, RandomInitializer, TargetError, check_schedule, estimate_gradients, load_checkpoint,
                     load_masks, masks_from_scores, remove_stale_temps, save_checkpoint, save_masks, select_targets,
                     swap)
from maskmtl.checkpoint import rng_state, set_rng_state
from maskmtl.initializers import draw_masks
from maskmtl.masks import atomic_write_bytes
from toys import MLP, make

TASKS = ["a", "b", "c"]


def env(tmp: Path) -> SimpleNamespace:
    """A tiny MLP (fc1.weight [16, 6], fc1.bias [16], fc2.weight [3, 16], fc2.bias [3]) with the two
    weights as targets, three tasks in three groups, its masked model, optimizer and a masks file."""
    model = make("mlp")
    shapes = {"fc1.weight": (16, 6), "fc2.weight": (3, 16)}
    masks = MaskSet(RandomInitializer(0.5).init_masks(shapes, 3, torch.Generator().manual_seed(0)), TASKS)
    path = tmp / "masks.safetensors"
    save_masks(masks, path)
    opt = MaskedAdamW(model.named_parameters(), masks)
    return SimpleNamespace(model=model, masks=masks, mm=MaskedModel(model, masks), opt=opt, path=path, tmp=tmp,
                           x=MLP.inputs(torch.Generator().manual_seed(1)))


def batches(task):
    return [MLP.inputs(torch.Generator().manual_seed(10 + task))]


def good_loss(forward, task, batch):
    return (forward(*batch) - task).square().mean() + 1.0


def updater(**kw):
    return MaskUpdater(AgreementScorer(), ConstantScheduler(kw.pop("alpha", 2)), every=1, **kw)


def masks_with(e, name, mask):
    d = e.masks.as_dict()
    d[name] = mask
    return MaskSet(d, TASKS)


def bad_shape_file(e):
    """A masks file whose fc1.weight mask is [3, 16, 5] (the model's weight is [16, 6])."""
    m = {"fc1.weight": torch.ones(3, 16, 5, dtype=torch.bool), "fc2.weight": e.masks["fc2.weight"]}
    p = e.tmp / "other.safetensors"
    save_masks(MaskSet(m, TASKS), p)
    return p


def raw_file(e, tensors, meta):
    from safetensors.torch import save_file

    p = e.tmp / "raw.safetensors"
    save_file(tensors, str(p), metadata=meta)
    return p


def ok_meta():
    return {"format": "maskmtl.masks/1", "tasks": '["a", "b", "c"]', "task_to_group": "[0, 1, 2]"}


def checkpoint_for(e, tasks):
    masks = MaskSet(e.masks.as_dict(), tasks)
    p = e.tmp / "ckpt.pt"
    save_checkpoint(p, step=3, model=e.model, masks=masks, optimizer=e.opt)
    return p


def step_optimizer(e, group):
    e.opt.zero_grad()
    good_loss(e.mm.bind(0), 0, e.x).backward()
    e.opt.step(group=group)


# (id, call, exception type, substrings of the message)
ROWS = [
    # ---- MaskSet -----------------------------------------------------------------------------
    ("maskset-no-targets", lambda e: MaskSet({}, TASKS), MaskError, ["at least one target"]),
    ("maskset-float-dtype", lambda e: MaskSet({"w": torch.ones(3, 4)}, TASKS), MaskError, ["'w'", "torch.bool"]),
    ("maskset-wrong-group-count", lambda e: MaskSet({"w": torch.ones(2, 4, dtype=torch.bool)}, TASKS), MaskError,
     ["'w'", "(2, 4)", "[3, *param.shape]"]),
    ("maskset-scalar-mask", lambda e: MaskSet({"w": torch.tensor(True)}, TASKS), MaskError, ["'w'", "[3, *param.shape]"]),
    ("maskset-repeated-task", lambda e: MaskSet({"w": torch.ones(2, 4, dtype=torch.bool)}, ["a", "a"]), MaskError,
     ["unique", "'a'"]),
    ("maskset-t2g-length", lambda e: MaskSet({"w": torch.ones(1, 4, dtype=torch.bool)}, TASKS, [0]), MaskError,
     ["task_to_group has 1 entries for 3 tasks"]),
    ("maskset-t2g-gap", lambda e: MaskSet({"w": torch.ones(2, 4, dtype=torch.bool)}, TASKS, [0, 2, 2]), MaskError,
     ["task_to_group", "0..G-1", "[0, 2]"]),
    ("maskset-t2g-bool", lambda e: MaskSet({"w": torch.ones(2, 4, dtype=torch.bool)}, TASKS, [0, True, 1]),
     MaskIndexError, ["task_to_group[1]=True", "integer"]),
    ("maskset-t2g-float", lambda e: MaskSet({"w": torch.ones(2, 4, dtype=torch.bool)}, TASKS, [0, 1.5, 1]),
     MaskIndexError, ["task_to_group[1]=1.5", "integer"]),
    ("group_of-negative", lambda e: e.masks.group_of(-1), MaskIndexError, ["task=-1", "0..2", "negative"]),
    ("group_of-past-end", lambda e: e.masks.group_of(3), MaskIndexError, ["task=3", "0..2"]),
    ("group_of-bool", lambda e: e.masks.group_of(True), MaskIndexError, ["task=True", "bool", "0..2"]),
    ("group_of-float", lambda e: e.masks.group_of(1.0), MaskIndexError, ["task=1.0", "float", "0..2"]),
    ("group_of-float-tensor", lambda e: e.masks.group_of(torch.tensor(1.0)), MaskIndexError, ["task=", "0..2"]),
    ("group_of-unknown-name", lambda e: e.masks.group_of("zz"), MaskIndexError, ["task='zz'", "['a', 'b', 'c']"]),
    ("for_task-negative", lambda e: e.masks.for_task(-2), MaskIndexError, ["task=-2", "0..2"]),
    ("group-negative", lambda e: e.masks.group(-1), MaskIndexError, ["g=-1", "group", "0..2"]),
    ("group-past-end", lambda e: e.masks.group(3), MaskIndexError, ["g=3", "group", "0..2"]),
    ("group-none", lambda e: e.masks.group(None), MaskIndexError, ["g=None", "0..2"]),
    ("getitem-unknown-target", lambda e: e.masks["fc1.weigth"], MaskTargetError, ["'fc1.weigth'", "fc1.weight"]),
    ("set_masks-targets", lambda e: e.masks.set_masks({"fc1.weight": e.masks["fc1.weight"]}), MaskError,
     ["set_masks", "fc2.weight"]),
    ("set_masks-shape", lambda e: e.masks.set_masks({"fc1.weight": torch.ones(3, 16, 1, dtype=torch.bool),
                                                      "fc2.weight": e.masks["fc2.weight"]}), MaskError,
     ["set_masks", "'fc1.weight'", "(3, 16, 1)", "(3, 16, 6)"]),
    ("set_grouping-targets", lambda e: e.masks.set_grouping([0, 0, 1], {}), MaskError, ["set_grouping", "fc1.weight"]),
    ("set_grouping-groups", lambda e: e.masks.set_grouping([0, 0, 1], e.masks.as_dict()), MaskError,
     ["set_grouping", "'fc1.weight'", "[2, *(16, 6)]"]),
    ("voting-negative", lambda e: e.masks.voting_mask(-1), MaskError, ["voting threshold", ">= 0", "-1"]),
    ("state_dict-other-tasks", lambda e: MaskSet(e.masks.as_dict(), ["a", "b", "x"]).load_state_dict(e.masks.state_dict()),
     MaskError, ["tasks", "'c'", "'x'"]),
    # ---- MaskedModel ---------------------------------------------------------------------------
    ("maskedmodel-unknown-target", lambda e: MaskedModel(e.model, masks_with(e, "fc3.weight", e.masks["fc2.weight"])),
     MaskTargetError, ["'fc3.weight'", "fc2.weight", "MLP"]),
    ("maskedmodel-broadcast-row", lambda e: MaskedModel(e.model, masks_with(e, "fc1.weight", torch.ones(3, 6, dtype=torch.bool))),
     MaskError, ["'fc1.weight'", "[3, 6]", "[3, 16, 6]", "[groups, *param.shape]"]),
    ("maskedmodel-broadcast-1", lambda e: MaskedModel(e.model, masks_with(e, "fc1.weight", torch.ones(3, 1, 6, dtype=torch.bool))),
     MaskError, ["'fc1.weight'", "[3, 1, 6]", "[3, 16, 6]"]),
    ("maskedmodel-transposed", lambda e: MaskedModel(e.model, masks_with(e, "fc1.weight", torch.ones(3, 6, 16, dtype=torch.bool))),
     MaskError, ["'fc1.weight'", "[3, 6, 16]", "[3, 16, 6]"]),
    ("call-negative-task", lambda e: e.mm(-1, *e.x), MaskIndexError, ["task=-1", "0..2"]),
    ("call-unknown-task", lambda e: e.mm("d", *e.x), MaskIndexError, ["task='d'", "['a', 'b', 'c']"]),
    ("bind-past-end", lambda e: e.mm.bind(5), MaskIndexError, ["task=5", "0..2"]),
    ("bind-float", lambda e: e.mm.bind(0.5), MaskIndexError, ["task=0.5", "float"]),
    ("forward_group-past-end", lambda e: e.mm.forward_group(3, *e.x), MaskIndexError, ["group=3", "0..2"]),
    ("masked_params-negative", lambda e: e.mm.masked_params(-1), MaskIndexError, ["group=-1", "0..2"]),
    # ---- MaskedAdamW ---------------------------------------------------------------------------
    ("adamw-lr", lambda e: MaskedAdamW(e.model.named_parameters(), e.masks, lr=0.0), ValueError, ["lr", "> 0", "0.0"]),
    ("adamw-betas", lambda e: MaskedAdamW(e.model.named_parameters(), e.masks, betas=(1.0, 0.9)), ValueError,
     ["betas", "[0, 1)", "(1.0, 0.9)"]),
    ("adamw-weight-decay", lambda e: MaskedAdamW(e.model.named_parameters(), e.masks, weight_decay=-1), ValueError,
     ["weight_decay", ">= 0", "-1"]),
    ("adamw-target-not-a-param", lambda e: MaskedAdamW([("fc1.weight", e.model.fc1.weight)], e.masks), MaskTargetError,
     ["'fc2.weight'", "optimizer"]),
    ("adamw-broadcast-mask", lambda e: MaskedAdamW(e.model.named_parameters(),
                                                   masks_with(e, "fc2.weight", torch.ones(3, 1, 16, dtype=torch.bool))),
     MaskError, ["'fc2.weight'", "[3, 1, 16]", "[3, 3, 16]"]),
    ("adamw-step-negative", lambda e: step_optimizer(e, -1), MaskIndexError, ["group=-1", "0..2"]),
    ("adamw-step-past-end", lambda e: step_optimizer(e, 3), MaskIndexError, ["group=3", "0..2"]),
    ("adamw-step-bool", lambda e: step_optimizer(e, True), MaskIndexError, ["group=True", "bool"]),
    ("adamw-step-float", lambda e: step_optimizer(e, 1.0), MaskIndexError, ["group=1.0", "float"]),
    ("adamw-reset-unknown", lambda e: e.opt.reset_entries({"fc9.weight": torch.ones(3, dtype=torch.bool)}),
     MaskTargetError, ["reset_entries", "fc9.weight"]),
    ("adamw-reset-shape", lambda e: e.opt.reset_entries({"fc1.weight": torch.ones(16, dtype=torch.bool)}), MaskError,
     ["reset_entries", "'fc1.weight'", "[16, 6]", "[16]"]),
    # ---- MaskUpdater, gradients, swap ----------------------------------------------------------
    ("updater-every", lambda e: MaskUpdater(AgreementScorer(), ConstantScheduler(1), every=-1),
     ValueError, ["masking.update_every", ">= 0", "-1"]),
    ("updater-recovery", lambda e: updater(recovery_gradient="sparse"), ValueError,
     ["masking.recovery_gradient", "'sparse'", "dense"]),
    ("updater-recovered-state", lambda e: updater(recovered_state="zero"), ValueError,
     ["masking.recovered_state", "'zero'", "reset_dormant"]),
    ("update-constant-loss", lambda e: updater().update(1, e.model, e.masks, lambda f, t, b: torch.tensor(1.0), batches),
     ValueError, ["task 0 ('a')", "depends on none of the 2 mask targets", "fc1.weight, fc2.weight"]),
    ("update-loss-on-unmasked-params", lambda e: updater().update(
        1, e.model, e.masks, lambda f, t, b: e.model.fc2.bias.sum() + t, batches),
     ValueError, ["task 0 ('a')", "depends on none", "fc1.weight"]),
    ("update-non-scalar-loss", lambda e: updater().update(1, e.model, e.masks, lambda f, t, b: f(*b), batches),
     ValueError, ["scalar", "(5, 3)", "task 0 ('a')"]),
    ("update-loss-not-tensor", lambda e: updater().update(1, e.model, e.masks, lambda f, t, b: 1.0, batches),
     ValueError, ["scalar tensor", "float", "task 0"]),
    ("update-no-batches", lambda e: updater().update(1, e.model, e.masks, good_loss, lambda t: []), ValueError,
     ["batches(0)", "no batch", "'a'"]),
    ("update-alpha-too-large", lambda e: updater(alpha=100).update(1, e.model, e.masks, good_loss, batches),
     MaskUpdateError, ["group 0", "alpha=100", "eta_max"]),
    ("update-fisher-zero-loss", lambda e: MaskUpdater(FisherScorer(), ConstantScheduler(1), every=1).update(
        1, e.model, e.masks, lambda f, t, b: 0.0 * f(*b).sum(), batches),
     ValueError, ["log L", "positive finite loss", "log_loss=false"]),
    ("update-masks-wrong-shape", lambda e: updater().update(
        1, e.model, masks_with(e, "fc1.weight", torch.ones(3, 16, 1, dtype=torch.bool)), good_loss, batches),
     MaskError, ["'fc1.weight'", "[3, 16, 1]", "[3, 16, 6]"]),
    ("estimate-recovery", lambda e: estimate_gradients(e.model, e.masks, good_loss, batches, recovery="sparse"),
     ValueError, ["masking.recovery_gradient", "'sparse'"]),
    ("swap-negative-alpha", lambda e: swap(e.masks.as_dict(), e.masks.as_dict(), e.masks.as_dict(), -1),
     MaskUpdateError, ["alpha", ">= 0", "-1"]),
    ("swap-nan-scores", lambda e: swap({"w": torch.tensor([[True, False]])}, {"w": torch.tensor([[float("nan"), 0.0]])},
                                       {"w": torch.zeros(1, 2)}, 1), MaskUpdateError, ["group 0", "NaN"]),
    ("masks_from_scores-density", lambda e: masks_from_scores({"w": torch.zeros(1, 4)}, 0.0), ValueError,
     ["density", "(0, 1]", "0.0"]),
    ("check_schedule", lambda e: check_schedule(CosineScheduler(0, 500, 10), e.masks), MaskUpdateError,
     ["scheduler", "alpha reaches 500", "scheduler.eta_max"]),
    # ---- select_targets ------------------------------------------------------------------------
    ("targets-include-missing", lambda e: select_targets(e.model, None), TargetError, ["targets.include", "required"]),
    ("targets-include-bad-regex", lambda e: select_targets(e.model, "fc1.(weight"), TargetError,
     ["targets.include='fc1.(weight'", "regular expression"]),
    ("targets-include-regex-no-match", lambda e: select_targets(e.model, "fc3.weight"), TargetError,
     ["targets.include='fc3.weight'", "matched none", "fc1.weight"]),
    ("targets-include-entry-typo", lambda e: select_targets(e.model, ["fc1.weight", "fc2.weigth"]), TargetError,
     ["targets.include entry 'fc2.weigth'", "matches no parameter", "fc2.weight"]),
    ("targets-include-entry-suffix-typo", lambda e: select_targets(e.model, ["wieght"]), TargetError,
     ["targets.include entry 'wieght'", "weight"]),
    ("targets-exclude-entry-typo", lambda e: select_targets(e.model, ".*weight", ["fc2.wieght"]), TargetError,
     ["targets.exclude entry 'fc2.wieght'", "fc2.weight"]),
    ("targets-exclude-everything", lambda e: select_targets(e.model, ".*weight", ".*"), TargetError,
     ["targets.exclude='.*'", "excluded all 2", "targets.include='.*weight'"]),
    ("targets-include-item-type", lambda e: select_targets(e.model, ["fc1.weight", 3]), TargetError,
     ["targets.include", "item 3"]),
    ("targets-include-empty-item", lambda e: select_targets(e.model, [""]), TargetError, ["targets.include", "item ''"]),
    ("targets-custom-key", lambda e: select_targets(e.model, ["fc9.weight"], key="model.targets"), TargetError,
     ["model.targets.include entry 'fc9.weight'"]),
    ("targets-tied-alias", lambda e: select_targets(make("tied"), ["proj.weight"]), TargetError,
     ["'proj.weight'", "tied to 'emb.weight'"]),
    # ---- initializers, schedulers, scorers, groupers -------------------------------------------
    ("random-density-zero", lambda e: RandomInitializer(0.0), ValueError, ["initializer.density", "(0, 1]", "0.0"]),
    ("random-density-above-one", lambda e: RandomInitializer(1.5), ValueError, ["initializer.density", "1.5"]),
    ("erk-density-negative", lambda e: ERKInitializer(-0.1), ValueError, ["initializer.density", "-0.1"]),
    ("draw-masks-groups", lambda e: draw_masks({"w": 0.5}, {"w": (4,)}, 0, torch.Generator()), ValueError,
     ["n_groups", ">= 1", "0"]),
    ("cosine-eta-min", lambda e: CosineScheduler(-1, 5, 10), ValueError, ["scheduler.eta_min", "-1"]),
    ("cosine-eta-max-fraction", lambda e: CosineScheduler(0, 2.5, 10), ValueError, ["scheduler.eta_max", "2.5"]),
    ("cosine-total-steps", lambda e: CosineScheduler(0, 5, 0), ValueError, ["total steps", "train.steps", "0"]),
    ("constant-alpha", lambda e: ConstantScheduler(-1), ValueError, ["scheduler.alpha", ">= 0", "-1"]),
    ("scorer-weighting", lambda e: AgreementScorer(weighting="mine"), ValueError, ["scorer.weighting", "'mine'", "paper"]),
    ("scorer-lam", lambda e: FisherScorer(lam=-1), ValueError, ["scorer.lam", ">= 0", "-1"]),
    ("grouper-algorithm", lambda e: KNNGrouper(2, algorithm="dbscan"), ValueError, ["grouper.algorithm", "'dbscan'", "kmeans"]),
    ("grouper-n-groups", lambda e: KNNGrouper(0), ValueError, ["grouper.n_groups", ">= 1", "0"]),
    ("grouper-more-groups-than-tasks", lambda e: KNNGrouper(5).n_groups(3), ValueError,
     ["grouper.n_groups=5", "number of tasks (3)"]),
    ("grouper-nan-vectors", lambda e: KNNGrouper(2).group(torch.tensor([[float("nan")], [1.0], [2.0]]), 0), ValueError,
     ["grouper", "NaN"]),
    # ---- masks files ---------------------------------------------------------------------------
    ("load-missing-file", lambda e: load_masks(e.masks, e.tmp / "nope.safetensors"), MaskError,
     ["nope.safetensors", "does not exist"]),
    ("load-truncated-file", lambda e: (e.path.write_bytes(e.path.read_bytes()[:40]), load_masks(e.masks, e.path)),
     MaskError, ["masks.safetensors", "not a readable safetensors file"]),
    ("load-foreign-format", lambda e: load_masks(e.masks, raw_file(e, {"fc1.weight": torch.ones(3, 16, 6, dtype=torch.bool)},
                                                                    {"format": "other"})),
     MaskError, ["raw.safetensors", "metadata format", "'other'", "maskmtl.masks/1"]),
    ("load-no-task-metadata", lambda e: load_masks(e.masks, raw_file(e, {"w": torch.ones(3, 2, dtype=torch.bool)},
                                                                      {"format": "maskmtl.masks/1"})),
     MaskError, ["raw.safetensors", "'tasks'", "task_to_group"]),
    ("load-uint8-values", lambda e: load_masks(e.masks, raw_file(e, {"fc1.weight": torch.full((3, 16, 6), 2, dtype=torch.uint8)},
                                                                  ok_meta())),
     MaskError, ["raw.safetensors", "'fc1.weight'", "other than 0 and 1"]),
    ("load-float-tensor", lambda e: load_masks(e.masks, raw_file(e, {"fc1.weight": torch.ones(3, 16, 6)}, ok_meta())),
     MaskError, ["raw.safetensors", "'fc1.weight'", "torch.float32", "bool"]),
    ("load-other-tasks", lambda e: load_masks(MaskSet(e.masks.as_dict(), ["a", "b", "x"]), e.path), MaskError,
     ["masks.safetensors", "tasks", "'x'"]),
    ("load-missing-target", lambda e: load_masks(MaskSet({"fc1.weight": e.masks["fc1.weight"]}, TASKS),
                                                 raw_file(e, {"fc2.weight": torch.ones(3, 3, 16, dtype=torch.bool)}, ok_meta())),
     MaskError, ["raw.safetensors", "missing ['fc1.weight']", "unexpected ['fc2.weight']"]),
    ("load-shape-vs-maskset", lambda e: load_masks(e.masks, bad_shape_file(e)), MaskError,
     ["other.safetensors", "'fc1.weight'", "(3, 16, 5)", "[3, 16, 6]"]),
    ("load-shape-vs-model", lambda e: load_masks(MaskSet(dict(e.masks.as_dict(), **{"fc1.weight": torch.ones(3, 16, 5, dtype=torch.bool)}),
                                                         TASKS), bad_shape_file(e), model=e.model),
     MaskError, ["other.safetensors", "'fc1.weight'", "[3, 16, 5]", "[3, 16, 6]"]),
    ("load-target-not-in-model", lambda e: load_masks(e.masks, e.path, model=make("conv")), MaskTargetError,
     ["masks.safetensors", "'fc1.weight'", "Conv"]),
    # ---- checkpoints ---------------------------------------------------------------------------
    ("checkpoint-missing", lambda e: load_checkpoint(e.tmp / "none.pt", model=e.model, masks=e.masks, optimizer=e.opt),
     RuntimeError, ["none.pt", "cannot be read"]),
    ("checkpoint-not-ours", lambda e: (torch.save({"weights": torch.ones(2)}, e.tmp / "w.pt"),
                                       load_checkpoint(e.tmp / "w.pt", model=e.model, masks=e.masks, optimizer=e.opt)),
     RuntimeError, ["w.pt", "not a maskmtl checkpoint", "'masks'"]),
    ("checkpoint-other-tasks", lambda e: load_checkpoint(checkpoint_for(e, ["a", "b", "x"]), model=e.model,
                                                         masks=e.masks, optimizer=e.opt),
     MaskError, ["ckpt.pt", "masks", "'x'"]),
    ("checkpoint-other-model", lambda e: load_checkpoint(checkpoint_for(e, TASKS), model=make("conv"), masks=e.masks,
                                                         optimizer=e.opt),
     RuntimeError, ["ckpt.pt", "model state", "conv.weight"]),
    ("checkpoint-missing-generator", lambda e: set_rng_state(rng_state(), {"data": torch.Generator()}),
     KeyError, ["generator 'data'"]),
]


@pytest.mark.parametrize("call, exc, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_with_a_clear_message(call, exc, words, tmp_path):
    e = env(tmp_path)
    with pytest.raises(exc) as info:
        call(e)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} missing from the message: {msg}"


def test_table_is_large_and_ids_unique():
    ids = [r[0] for r in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 50


def test_numpy_and_tensor_integers_are_accepted_as_indices(tmp_path):
    import numpy as np

    e = env(tmp_path)
    assert e.masks.group_of(np.int64(2)) == 2 and e.masks.group_of(torch.tensor(1)) == 1
    assert e.masks.group_of("b") == 1
    torch.testing.assert_close(e.mm(np.int32(1), *e.x), e.mm(1, *e.x))
    step_optimizer(e, np.int64(2))  # no error


def test_exclude_regex_matching_nothing_is_allowed(tmp_path):
    # the recipes' exclude regex (norms, time embeddings) is shared by models with and without them
    e = env(tmp_path)
    assert [t.name for t in select_targets(e.model, r".*\.weight", r".*(ln|norm|timestep).*")] == ["fc1.weight", "fc2.weight"]
    assert [t.name for t in select_targets(e.model, ["weight"], [])] == ["fc1.weight", "fc2.weight"]


# ---- atomic writes: file mode and stale temporary files ---------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("replace", [True, False])
def test_atomic_write_mode_follows_umask(tmp_path, umask, mode, replace):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"data", replace=replace)
        with open(tmp_path / "plain.bin", "wb") as f:  # what a normal open() gives
            f.write(b"data")
    finally:
        os.umask(old)
    got = stat.S_IMODE(os.stat(tmp_path / "out.bin").st_mode)
    assert got == mode == stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "plain.bin"]


def test_save_masks_is_readable_by_the_group(tmp_path):
    old = os.umask(0o022)
    try:
        save_masks(env(tmp_path).masks, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o644


def test_killed_write_leaves_a_temp_file_that_remove_stale_temps_removes(tmp_path):
    # A writer stalls inside atomic_write_bytes (after the data, before the rename) and is SIGKILLed.
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from maskmtl.masks import atomic_write_bytes
        def stall(fd):
            open({str(tmp_path / "ready")!r}, "w").close()
            time.sleep(60)
        os.fsync = stall
        atomic_write_bytes({str(tmp_path / "masks.safetensors")!r}, b"x" * 1000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 30
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.time() < deadline, "writer did not start"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / "ready").unlink()
    left = sorted(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".masks.safetensors.") and left[0].name.endswith(".tmp")
    # files that merely look alike are kept
    keep = [tmp_path / n for n in (".masks.safetensors.tmp", ".x.abc.tmp", "a.masks.abcdefgh.tmp",
                                   ".x.ABCDEFGH.tmp", ".x.abcdefgh.tmp.bak", "results.json")]
    for p in keep:
        p.write_bytes(b"keep")
    (tmp_path / ".d.abcdefgh.tmp").mkdir()  # a folder with the pattern's name: kept
    assert remove_stale_temps(tmp_path) == left
    assert sorted(tmp_path.iterdir()) == sorted(keep + [tmp_path / ".d.abcdefgh.tmp"])
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path / "no-such-folder") == []


def test_remove_stale_temps_spares_recent_files_with_min_age(tmp_path):
    old, new = tmp_path / ".a.json.abcd_123.tmp", tmp_path / ".b.json.zz99zz99.tmp"
    old.write_bytes(b""), new.write_bytes(b"")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert remove_stale_temps(tmp_path, min_age_s=60) == [old]
    assert new.exists()


# ---- ranking in the scores' own dtype ----------------------------------------------------------

def test_float64_scores_rank_without_rounding_to_float32():
    # Six active entries whose float64 drop scores differ by 1e-12, lowest at the end; two inactive
    # entries whose grow scores differ by 1e-12. In float32 all six (and both) are the same number.
    drop = torch.tensor([[1.0 + (5 - i) * 1e-12 for i in range(6)] + [0.0, 0.0]], dtype=torch.float64)
    grow = torch.tensor([[0.0] * 6 + [1.0, 1.0 + 1e-12]], dtype=torch.float64)
    masks = {"w": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)}
    assert drop.float()[0, :6].unique().numel() == 1, "a float32 cast ties these scores"
    res = swap(masks, {"w": drop}, {"w": grow}, alpha=2)
    assert res.dropped["w"][0].nonzero().reshape(-1).tolist() == [4, 5]  # the two lowest in float64
    res = swap(masks, {"w": drop}, {"w": grow}, alpha=1)
    assert res.dropped["w"][0].nonzero().reshape(-1).tolist() == [5]
    assert res.recovered["w"][0].nonzero().reshape(-1).tolist() == [7]
    # keeping the top 3 of 8 by float64 score: entries 0, 1, 2 (float32 would tie 0..5)
    kept = masks_from_scores({"w": drop}, 3 / 8)["w"][0]
    assert kept.nonzero().reshape(-1).tolist() == [0, 1, 2]


def test_float64_ranking_over_targets_of_mixed_dtypes():
    # a float32 target and a float64 target ranked together: compared in float64
    masks = {"a": torch.tensor([[True, True]]), "b": torch.tensor([[True, False]])}
    drop = {"a": torch.tensor([[1.0, 2.0]], dtype=torch.float32),
            "b": torch.tensor([[1.0 - 1e-12, 0.0]], dtype=torch.float64)}
    grow = {"a": torch.zeros(1, 2), "b": torch.tensor([[0.0, 5.0]], dtype=torch.float64)}
    res = swap(masks, drop, grow, alpha=1)
    assert res.dropped["b"][0].tolist() == [True, False] and not res.dropped["a"].any()
