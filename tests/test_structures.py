"""Structured masks (masking.granularity=unit|head) and their export: contracts on the toys,
golden numbers for aggregation and the per-structure swap, export equal to the masked model."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from maskmtl import (DenseInitializer, ERKInitializer, FisherScorer, MaskedModel, MaskSet, MaskUpdater,
                     RandomInitializer, select_targets)
from maskmtl.config import ConfigError, Masking
from maskmtl.export import ExportError, call, export_pruned, load_export, read_export_meta, save_export
from maskmtl.schedulers import ConstantScheduler
from maskmtl.structures import StructureError, StructureMap, build_structures
from maskmtl.update import MaskUpdateError, check_schedule, group_tasks
from toys import INCLUDE, TOYS, loss_fn, make

# toy -> granularities that find structures; the others have none (output layer, LayerNorm,
# tied weights, nn.MultiheadAttention) and must say so
STRUCTURED = {"mlp": ("unit",), "conv": ("unit",), "embedding": ("unit",), "heads": ("unit", "head")}
INITS = {"dense": DenseInitializer(), "random": RandomInitializer(0.5), "erk": ERKInitializer(0.5)}
CASES = [(k, g) for k, gs in STRUCTURED.items() for g in gs]


def inputs(kind, seed=0):
    return TOYS[kind].inputs(torch.Generator().manual_seed(seed))


def smap_for(kind, granularity, reduce="sum", seed=0):
    model = make(kind, seed)
    names = [t.name for t in select_targets(model, INCLUDE)]
    return model, build_structures(model, names, granularity, inputs(kind), reduce=reduce)


def family_counts(smap: StructureMap, masks) -> dict[str, list[int]]:
    sm = smap.to_structures(masks)
    return {f.root: sm[:, f.first:f.first + f.count].sum(1).tolist() for f in smap.families}


# ---- the map itself -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,granularity", CASES)
def test_structure_map_covers_targets_consistently(kind, granularity):
    model, smap = smap_for(kind, granularity)
    params = dict(model.named_parameters())
    for n, ids in smap.ids.items():
        assert ids.shape == params[n].shape and ids.dtype == torch.int64
        assert int(ids.min()) >= -1 and int(ids.max()) < smap.n_structures
    # every structure has entries, sizes add up, families tile the id range in order
    assert int(smap.sizes.min()) > 0 and smap.structured_numel() == sum(int((i >= 0).sum()) for i in smap.ids.values())
    first = 0
    for f in smap.families:
        assert f.first == first and f.count > 0
        assert smap.sizes[f.first:f.first + f.count].tolist() == [f.size] * f.count
        first += f.count
    if granularity == "head":
        assert [f.kind for f in smap.families][0] == "head" and smap.families[0].count == 2


@pytest.mark.parametrize("kind", ["attention", "layernorm", "tied"])
def test_toys_without_structures_fail_with_the_reason(kind):
    model = make(kind)
    names = [t.name for t in select_targets(model, INCLUDE)]
    with pytest.raises(StructureError, match="no structure among the targets"):
        build_structures(model, names, "unit", inputs(kind))


def test_head_granularity_needs_declared_heads():
    model = make("mlp")
    with pytest.raises(StructureError, match="declares no attention heads"):
        build_structures(model, ["fc1.weight", "fc2.weight"], "head", inputs("mlp"))


def test_unit_structures_skip_overlapping_layers_of_a_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    smap = build_structures(model, ["0.weight", "2.weight", "4.weight"], "unit", torch.randn(2, 3))
    # units of layer 0 take rows of 0 and columns of 2; layer 2's units would need rows of 2 too
    assert [(f.root, f.count, f.size) for f in smap.families] == [("0", 5, 3 + 4)]
    assert any("units of 2: skipped, overlaps" in line for line in smap.report)
    assert (smap.ids["4.weight"] == -1).all()


def test_consumer_outside_the_targets_is_not_a_structure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(StructureError, match="consumer 2.weight is not a mask target"):
        build_structures(model, ["0.weight"], "unit", torch.randn(2, 3))


def test_untraceable_model_is_a_structure_error():
    model = make("mlp")
    with pytest.raises(StructureError, match="could not trace"):
        build_structures(model, ["fc1.weight", "fc2.weight"], "unit", torch.randn(2, 7))  # wrong width


# ---- initialisation, swap, masks_from_scores per structure ------------------------------------

@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind,granularity", CASES)
def test_initializers_draw_exact_structure_counts(kind, granularity, init):
    _, smap = smap_for(kind, granularity)
    masks = smap.init_masks(INITS[init], 3, torch.Generator().manual_seed(4))
    again = smap.init_masks(INITS[init], 3, torch.Generator().manual_seed(4))
    dens = smap.family_densities(INITS[init])
    sm = smap.to_structures(masks)  # raises unless constant within structures and on outside them
    for f in smap.families:
        want = int(round(dens[f"{f.kind}:{f.root}"] * f.count))
        assert sm[:, f.first:f.first + f.count].sum(1).tolist() == [want] * 3
    for n, ids in smap.ids.items():
        assert masks[n][:, ids < 0].all()
        assert torch.equal(masks[n], again[n])


@pytest.mark.parametrize("kind,granularity", CASES)
def test_structured_update_keeps_invariants_per_structure(kind, granularity):
    model, smap = smap_for(kind, granularity)
    masks = MaskSet(smap.init_masks(RandomInitializer(0.5), 2, torch.Generator().manual_seed(0)), ["a", "b"])
    before = masks.as_dict()
    before = {n: m.clone() for n, m in before.items()}
    counts = smap.counts(before)
    mean_size = smap.structured_numel() / smap.n_structures
    alpha_entries = int(mean_size) + 1  # -> 2 structures each way
    updater = MaskUpdater(FisherScorer(), ConstantScheduler(alpha_entries), every=1, structures=smap)

    def batches(task):
        g = torch.Generator().manual_seed(100 + task)
        return [TOYS[kind].inputs(g) for _ in range(2)]

    metrics = updater.update(1, model, masks, loss_fn, batches)
    assert smap.alpha(alpha_entries) == 2 and metrics["mask/swapped"] == 2 * 2 * 2
    after = smap.to_structures(masks.as_dict())  # constant within structures
    b = smap.to_structures(before)
    assert torch.equal(after.sum(1), counts)  # same number of structures per group
    assert ((after != b).sum(1) == 4).all()  # exactly 2 dropped + 2 recovered per group
    for n, ids in smap.ids.items():
        assert masks[n][:, ids < 0].all()  # entries in no structure never move


def test_swap_raises_when_alpha_exceeds_a_groups_structures():
    _, smap = smap_for("mlp", "unit")  # 16 structures
    masks = MaskSet(smap.init_masks(RandomInitializer(0.75), 1, torch.Generator().manual_seed(0)), ["a"])
    size = smap.structured_numel() / smap.n_structures
    with pytest.raises(MaskUpdateError, match="inactive"):
        check_schedule(ConstantScheduler(int(5 * size)), masks, structures=smap)  # 5 > 4 inactive
    check_schedule(ConstantScheduler(int(4 * size)), masks, structures=smap)


def test_masks_from_scores_keeps_whole_structures():
    _, smap = smap_for("heads", "head")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn((2, *ids.shape), generator=g) for n, ids in smap.ids.items()}
    kept = smap.masks_from_scores(scores, 0.5)
    sm = smap.to_structures(kept)
    assert sm.sum(1).tolist() == [round(0.5 * smap.n_structures)] * 2
    agg = smap.aggregate(scores)
    for row in range(2):  # the kept structures are the top-scoring half
        top = set(torch.topk(agg[row], int(sm[row].sum())).indices.tolist())
        assert top == set(sm[row].nonzero().flatten().tolist())


def test_group_tasks_with_structures_gives_structured_group_masks():
    model, smap = smap_for("mlp", "unit")
    from maskmtl import KNNGrouper
    tasks = ["a", "b", "c", "d"]
    masks = MaskSet({n: torch.ones((4, *ids.shape), dtype=torch.bool) for n, ids in smap.ids.items()}, tasks)

    def batches(task):
        gen = torch.Generator().manual_seed(10 + task)
        return [TOYS["mlp"].inputs(gen)]

    out = group_tasks(model, masks, FisherScorer(), KNNGrouper(2), loss_fn, batches, 0.5, 0, structures=smap)
    assert out["task_vectors"].shape == (4, smap.n_structures)
    assert smap.counts(masks.as_dict()).tolist() == [8] * masks.n_groups


# ---- golden numbers ---------------------------------------------------------------------

def _tiny():
    """Linear(2, 3) -> ReLU -> Linear(3, 1): three units, each 2 weights + 1 bias + 1 column."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    return model, build_structures(model, ["0.weight", "0.bias", "2.weight"], "unit", torch.randn(1, 2), reduce="sum")


def test_golden_structure_ids_and_aggregation():
    model, smap = _tiny()
    assert smap.ids["0.weight"].tolist() == [[0, 0], [1, 1], [2, 2]]
    assert smap.ids["0.bias"].tolist() == [0, 1, 2] and smap.ids["2.weight"].tolist() == [[0, 1, 2]]
    scores = {"0.weight": torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]),
              "0.bias": torch.tensor([[10.0, 20.0, 30.0]]),
              "2.weight": torch.tensor([[[-1.0, 0.5, 100.0]]])}
    # sums: unit 0: 1+2+10-1 = 12; unit 1: 3+4+20+0.5 = 27.5; unit 2: 5+6+30+100 = 141
    assert smap.aggregate(scores).tolist() == [[12.0, 27.5, 141.0]]
    smap_mean = StructureMap(smap.ids, smap.families, reduce="mean")
    assert smap_mean.aggregate(scores).tolist() == [[3.0, 6.875, 35.25]]


def test_golden_structured_swap():
    model, smap = _tiny()
    on = torch.tensor([[True, True, False]])
    masks = smap.to_elements(on)
    drop = {"0.weight": torch.tensor([[[5.0, 5.0], [1.0, 1.0], [0.0, 0.0]]]),
            "0.bias": torch.zeros(1, 3), "2.weight": torch.zeros(1, 1, 3)}
    grow = {"0.weight": torch.tensor([[[0.0, 0.0], [0.0, 0.0], [-9.0, 9.5]]]),
            "0.bias": torch.zeros(1, 3), "2.weight": torch.zeros(1, 1, 3)}
    res = smap.swap(masks, drop, grow, 1)
    # unit 1 has the lower drop score (2 < 10) among the active units; unit 2 is the only inactive one
    assert smap.to_structures(res.masks).tolist() == [[True, False, True]]
    assert res.dropped["0.weight"][0].tolist() == [[False, False], [True, True], [False, False]]
    assert res.recovered["2.weight"][0].tolist() == [[False, False, True]]
    with pytest.raises(StructureError, match="not constant over structure 1"):
        bad = {n: m.clone() for n, m in masks.items()}
        bad["0.weight"][0, 1, 0] = False
        smap.to_structures(bad)


def test_alpha_in_entries_becomes_structures():
    _, smap = _tiny()  # 3 structures of 4 entries
    assert [smap.alpha(a) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


# ---- export -------------------------------------------------------------------------------

def _prompt_dt():
    from recipes.harmodt.model import PromptDT

    torch.manual_seed(0)
    model = PromptDT(39, 4, d_model=32, n_layer=2, n_head=4, dropout=0.1)
    g = torch.Generator().manual_seed(1)
    b, k, p = 3, 4, 2

    def seq(n):
        return (torch.randn(b, n, 39, generator=g), torch.randn(b, n, 4, generator=g), torch.randn(b, n, 1, generator=g),
                torch.randint(0, 500, (b, n), generator=g), torch.ones(b, n, dtype=torch.bool))
    s, a, r, t, m = seq(k)
    m[0, :2] = False  # left padding in one row
    x = {"states": s, "actions": a, "rtg": r, "timesteps": t, "mask": m, "prompt": seq(p)}
    names = [t.name for t in select_targets(model, r".*\.weight", r".*(ln|norm|timestep).*")]
    return model, x, names


EXPORT_CASES = {"mlp": "unit", "conv": "unit", "heads": "head", "prompt_dt": "head"}


def _export_setup(case):
    if case == "prompt_dt":
        model, x, names = _prompt_dt()
    else:
        model, x = make(case), inputs(case)
        names = [t.name for t in select_targets(model, INCLUDE)]
    smap = build_structures(model, names, EXPORT_CASES[case], x)
    masks = MaskSet(smap.init_masks(RandomInitializer(0.5), 2, torch.Generator().manual_seed(0)), ["a", "b"])
    return model, x, smap, masks


def _masked_out(model, masks, group, x):
    model.eval()
    mm = MaskedModel(model, masks)
    with torch.no_grad():
        return mm.forward_group(group, **x) if isinstance(x, dict) else mm.forward_group(group, *x)


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_equals_masked_model_and_is_smaller(case, tmp_path):
    model, x, smap, masks = _export_setup(case)
    ex = export_pruned(model, masks.group(1), smap, x)
    ref = _masked_out(model, masks, 1, x)
    with torch.no_grad():
        out = call(ex.model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert ex.params_pruned < ex.params_full
    if EXPORT_CASES[case] == "head":
        removed = sum(len(v) for v in ex.plan["heads"].values())
        assert removed > 0
    # other inputs than the traced ones give the same equality
    if case != "prompt_dt":
        x2 = inputs(case, seed=9)
        with torch.no_grad():
            torch.testing.assert_close(call(ex.model, x2), _masked_out(model, masks, 1, x2), atol=1e-5, rtol=0)
    # save, then rebuild from a freshly built full model with other weights
    save_export(ex, tmp_path / "exp", model_config={"case": case}, source={"group": 1})
    meta = read_export_meta(tmp_path / "exp")
    assert meta["source"] == {"group": 1} and meta["params_pruned"] == ex.params_pruned
    fresh = _prompt_dt()[0] if case == "prompt_dt" else make(case, seed=5)
    rebuilt = load_export(fresh, tmp_path / "exp", x)
    with torch.no_grad():
        torch.testing.assert_close(call(rebuilt, x), out, atol=0, rtol=0)
    with pytest.raises(FileExistsError):
        save_export(ex, tmp_path / "exp", model_config={}, source={})
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "exp").iterdir())
    json.loads((tmp_path / "exp" / "export.json").read_text())


def test_export_of_a_whole_family_and_of_full_masks():
    model, x, smap, masks = _export_setup("heads")
    on = smap.to_structures(masks.as_dict())
    on[0, :] = True
    on[1, :2] = False  # both heads of the attention removed
    masks.set_masks(smap.to_elements(on))
    full = export_pruned(model, masks.group(0), smap, x)
    assert full.params_pruned == full.params_full and full.plan["units"] == {} and full.plan["heads"] == {}
    no_heads = export_pruned(model, masks.group(1), smap, x)
    assert no_heads.model.n_head == 0 and no_heads.model.qkv.out_features == 0
    torch.testing.assert_close(call(no_heads.model, x), _masked_out(model, masks, 1, x), atol=1e-5, rtol=0)


def test_export_of_a_voting_mask():
    model, x, smap, masks = _export_setup("mlp")
    vote = masks.voting_mask(1)  # on where both tasks use it
    ex = export_pruned(model, vote, smap, x)
    ref_model = make("mlp")
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            if n in vote:
                p.mul_(vote[n])
        torch.testing.assert_close(call(ex.model, x), ref_model(*x), atol=1e-5, rtol=0)


def test_export_refuses_an_unstructured_mask():
    model, x, smap, masks = _export_setup("mlp")
    bad = {n: m.clone() for n, m in masks.group(0).items()}
    bad["fc1.weight"][0, 0] = not bool(bad["fc1.weight"][0, 0])
    with pytest.raises(ExportError, match="not constant"):
        export_pruned(model, bad, smap, x)


# ---- config -------------------------------------------------------------------------------

def _cfg(**masking):
    return OmegaConf.create({
        "targets": {"include": INCLUDE, "exclude": []},
        "initializer": {"_target_": "maskmtl.initializers.RandomInitializer", "density": 0.5},
        "scorer": {"_target_": "maskmtl.scorers.FisherScorer"},
        "scheduler": {"_target_": "maskmtl.schedulers.ConstantScheduler", "alpha": 10},
        "grouper": {"_target_": "maskmtl.groupers.NoneGrouper"},
        "train": {"steps": 10},
        "masking": {"update_every": 5, "grad_batches": 1, "recovery_gradient": "dense",
                    "recovered_state": "reset_dormant", "granularity": "element", "structure_reduce": "sum",
                    **masking},
    })


def test_masking_builds_structured_masks_from_config():
    model = make("mlp")
    m = Masking(_cfg(granularity="unit", structure_reduce="mean"), model, ["a", "b"], torch.Generator().manual_seed(0),
                example_inputs=inputs("mlp"))
    assert m.structures is not None and m.updater.structures is m.structures and m.structures.reduce == "mean"
    assert m.structures.counts(m.masks.as_dict()).tolist() == [8, 8]
    plain = Masking(_cfg(), make("mlp"), ["a", "b"], torch.Generator().manual_seed(0))
    assert plain.structures is None


@pytest.mark.parametrize("override,match", [
    ({"granularity": "channel"}, r"masking.granularity='channel': expected one of"),
    ({"granularity": "unit", "structure_reduce": "max"}, r"masking.structure_reduce='max'"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        Masking(_cfg(**override), make("mlp"), ["a"], torch.Generator(), example_inputs=inputs("mlp"))


@pytest.mark.parametrize("kind,x,match", [
    ("mlp", None, "passes no example inputs"),
    ("mlp", (torch.randn(2, 7),), "could not trace"),
    ("layernorm", "inputs", "no structure among the targets"),
    ("mlp", "inputs", "declares no attention heads"),
])
def test_config_errors_for_structures(kind, x, match):
    granularity = "head" if match.startswith("declares") else "unit"
    x = inputs(kind) if x == "inputs" else x
    with pytest.raises(ConfigError, match=f"masking.granularity={granularity}.*{match}"):
        Masking(_cfg(granularity=granularity), make(kind), ["a"], torch.Generator(), example_inputs=x)


def test_export_through_batchnorm_and_a_conv_chain():
    """conv → BN → ReLU → conv → flatten → Linear: the first conv's channels (through the BN,
    whose slices go with them) are the structures; the second conv's channels would share its
    entries and are skipped. Export, BN running statistics included, equals the masked model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 2, 5, 5))  # non-trivial running statistics
    x = (torch.randn(3, 2, 5, 5),)
    names = ["0.weight", "3.weight", "6.weight"]
    smap = build_structures(model, names, "unit", x)
    assert [(f.root, f.count) for f in smap.families] == [("0", 6)]  # "3" overlaps columns of 3.weight
    masks = MaskSet(smap.init_masks(RandomInitializer(0.5), 1, torch.Generator().manual_seed(0)), ["a"])
    ex = export_pruned(model, masks.group(0), smap, x)
    assert isinstance(ex.model[1], nn.BatchNorm2d) and ex.model[1].num_features == 3
    torch.testing.assert_close(call(ex.model, x), _masked_out(model, masks, 0, x), atol=1e-5, rtol=0)


def test_export_refuses_a_structure_whose_removal_is_not_its_mask():
    """A hand-made map that (wrongly) makes units of a Linear followed by a LayerNorm: zeroing a
    channel is not removing it (the norm's statistics change), and export must say so."""
    from maskmtl.structures import Family

    model, x = make("layernorm"), inputs("layernorm")
    ids = {"fc.weight": torch.arange(8)[:, None].expand(8, 5).clone(), "out.weight": torch.arange(8)[None].expand(2, 8).clone()}
    smap = StructureMap(ids, [Family("unit", "fc", 0, 8, 7)])
    on = torch.ones(1, 8, dtype=torch.bool)
    on[0, :3] = False
    with pytest.raises(ExportError, match="not equivalent to its mask"):
        export_pruned(model, {n: m[0] for n, m in smap.to_elements(on).items()}, smap, x)

