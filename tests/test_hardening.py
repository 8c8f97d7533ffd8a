"""Bad command-line input fails before anything is written, with a message naming the key; a
finished run's folder is never changed; a run folder resumes only under the config it started with.

Most rows run in-process: the config composed as ``tools/run.py`` composes it, then
``recipes.launch.prepare`` (every check that runs before a recipe touches its run folder). A few
go through the real command line for the exit status and the one-line error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_recipes import run as run_tool
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from maskmtl.config import ConfigError
from recipes.launch import config_diff, prepare

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def composed(overrides: list[str]):
    """(task config, command-line overrides, group choices) as tools/run.py would get them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    choices = {k: v for k, v in dict(cfg.hydra.runtime.choices).items() if not k.startswith("hydra")}
    task = list(cfg.hydra.overrides.task)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, task, choices


def prepared(overrides: list[str], out: Path):
    cfg, task, choices = composed(overrides)
    return prepare(cfg, out, task, choices), cfg


DIGITS = ["recipe=digits"]
HARMODT = ["recipe=harmodt", "debug=smoke"]
G = ["recipe=g_harmodt", "debug=smoke"]
MAKE = ["recipe=make_data", "debug=smoke"]

# (overrides, text the message must contain: the key, and the value or what was expected)
BAD = [
    # shared keys, by type and range
    (DIGITS + ["seed=abc"], "seed='abc'"),
    (DIGITS + ["seed=-1"], "seed=-1"),
    (DIGITS + ["seed=1.5"], "seed=1.5"),
    (DIGITS + ["seed=true"], "seed=True"),
    (DIGITS + ["threads=-1"], "threads=-1"),
    (DIGITS + ["threads=abc"], "threads='abc'"),
    (DIGITS + ["threads=0"], "threads=0"),
    (DIGITS + ["dry_run=maybe"], "dry_run='maybe'"),
    (DIGITS + ["dry_run=2"], "dry_run=2"),
    (DIGITS + ["device=tpu"], "device='tpu'"),
    (DIGITS + ["device=''"], "device=''"),
    (DIGITS + ["data_root=''"], "data_root=''"),
    (DIGITS + ["train.steps=0"], "train.steps=0"),
    (DIGITS + ["train.steps=-3"], "train.steps=-3"),
    (DIGITS + ["train.steps=1.5"], "train.steps=1.5"),
    (DIGITS + ["train.steps=abc"], "train.steps='abc'"),
    (DIGITS + ["train.batch_size=0"], "train.batch_size=0"),
    (DIGITS + ["train.lr=inf"], "train.lr=inf"),
    (DIGITS + ["train.lr=nan"], "train.lr=nan"),
    (DIGITS + ["train.lr=0"], "train.lr=0"),
    (DIGITS + ["train.lr=-1e-3"], "train.lr=-0.001"),
    (DIGITS + ["train.lr=fast"], "train.lr='fast'"),
    (DIGITS + ["train.weight_decay=-1"], "train.weight_decay=-1"),
    (DIGITS + ["train.weight_decay=inf"], "train.weight_decay=inf"),
    (DIGITS + ["train.betas=[0.9]"], "train.betas=[0.9]"),
    (DIGITS + ["train.betas=[0.9,1.0]"], "train.betas=[0.9, 1.0]"),
    (DIGITS + ["train.betas=[a,b]"], "train.betas=['a', 'b']"),
    (DIGITS + ["train.betas=0.9"], "train.betas=0.9"),
    (DIGITS + ["train.grad_clip=0"], "train.grad_clip=0"),
    (DIGITS + ["train.grad_clip=inf"], "train.grad_clip=inf"),
    (DIGITS + ["train.task_sampling=random"], "train.task_sampling='random'"),
    (DIGITS + ["train.log_every=0"], "train.log_every=0"),
    (DIGITS + ["train.eval_every=-1"], "train.eval_every=-1"),
    (DIGITS + ["train.checkpoint_every=-1"], "train.checkpoint_every=-1"),
    (DIGITS + ["masking.update_every=-1"], "masking.update_every=-1"),
    (DIGITS + ["masking.update_every=5000"], "masking.update_every=5000 > train.steps=4000"),
    (DIGITS + ["masking.grad_batches=0"], "masking.grad_batches=0"),
    (DIGITS + ["masking.granularity=block"], "masking.granularity='block'"),
    (DIGITS + ["masking.structure_reduce=max"], "masking.structure_reduce='max'"),
    (DIGITS + ["masking.recovery_gradient=sparse"], "masking.recovery_gradient='sparse'"),
    (DIGITS + ["masking.recovered_state=zero"], "masking.recovered_state='zero'"),
    (DIGITS + ["grouping.warmup_steps=-1"], "grouping.warmup_steps=-1"),
    (DIGITS + ["resume_safe=[1]"], "resume_safe=[1]"),
    # the plug-in groups' own values
    (DIGITS + ["initializer.density=1.5"], "initializer"),
    (DIGITS + ["initializer=random", "initializer.density=0"], "initializer"),
    (DIGITS + ["scheduler.eta_max=-1"], "scheduler"),
    (DIGITS + ["scorer.weighting=mine"], "scorer"),
    (DIGITS + ["grouper=knn", "grouper.algorithm=dbscan"], "grouper"),
    # keys and groups nothing would read
    (DIGITS + ["+foo=bar"], "+foo=bar: foo is not a key"),
    (DIGITS + ["+train.lrr=1"], "did you mean train.lr"),
    (DIGITS + ["++foo=1"], "++foo=1: foo is not a key"),
    (DIGITS + ["+scorer.lamda=3"], "+scorer.lamda=3"),
    (DIGITS + ["method=mtdt"], "method=mtdt: recipe=digits has no use for the method group"),
    (DIGITS + ["profile=paper"], "profile=paper: recipe=digits has no use"),
    (DIGITS + ["data=tiny"], "data=tiny: recipe=digits has no use"),
    (["recipe=g_harmodt", "profile=cpu"], "profile=cpu: recipe=g_harmodt has no use"),
    (MAKE + ["method=mtdt"], "method=mtdt: recipe=make_data has no use"),
    # digits' own keys
    (DIGITS + ["tasks=[]"], "tasks=[]"),
    (DIGITS + ["tasks=[digit,foo]"], "'foo'"),
    (DIGITS + ["tasks=[digit,digit]"], "tasks=['digit', 'digit']"),
    (DIGITS + ["data.test_fraction=0"], "data.test_fraction=0"),
    (DIGITS + ["data.test_fraction=1.5"], "data.test_fraction=1.5"),
    (DIGITS + ["model.hidden=0"], "model.hidden=0"),
    (DIGITS + ["model.depth=0"], "model.depth=0"),
    (DIGITS + ["model.dropout=1"], "model.dropout=1"),
    (DIGITS + ["model.task_input=maybe"], "model.task_input='maybe'"),
    (DIGITS + ["debug=smoke", "model.hidden=0"], "model.hidden=0"),  # smoke keeps an explicit value
    # harmodt: model, evaluation, data (all before any data is generated)
    (HARMODT + ["model.d_model=33"], "model.d_model=33: expected a multiple of model.n_head=4"),
    (HARMODT + ["model.n_head=0"], "model.n_head=0"),
    (HARMODT + ["model.n_layer=0"], "model.n_layer=0"),
    (HARMODT + ["model.dropout=-0.1"], "model.dropout=-0.1"),
    (HARMODT + ["model.prompt=maybe"], "model.prompt='maybe'"),
    (HARMODT + ["eval.episodes=0"], "eval.episodes=0"),
    (HARMODT + ["eval.parallel=0"], "eval.parallel=0"),
    (HARMODT + ["eval.max_steps=0"], "eval.max_steps=0"),
    (HARMODT + ["eval.max_steps=501"], "eval.max_steps=501"),
    (HARMODT + ["eval.rtg_quantile=2"], "eval.rtg_quantile=2"),
    (HARMODT + ["eval.rtg_quantile=-0.1"], "eval.rtg_quantile=-0.1"),
    (HARMODT + ["eval.seed=-1"], "eval.seed=-1"),
    (HARMODT + ["eval.stop_on_success=maybe"], "eval.stop_on_success='maybe'"),
    (["recipe=harmodt", "eval.episodes=0"], "eval.episodes=0"),  # outside smoke: failed after training before
    (["recipe=harmodt", "eval.parallel=0"], "eval.parallel=0"),
    (HARMODT + ["data.tasks=[]"], "data.tasks=[]"),
    (["recipe=harmodt", "data.tasks=[]"], "data.tasks=[]"),
    (HARMODT + ["data.tasks=[foo-v3]"], "data.taskset / data.tasks"),
    (HARMODT + ["data.taskset=MT7"], "data.taskset / data.tasks"),
    (HARMODT + ["data.transitions_per_task=-5"], "data.transitions_per_task=-5"),
    (HARMODT + ["data.transitions_per_task=abc"], "data.transitions_per_task='abc'"),
    (HARMODT + ["data.transitions_per_task=230"], "data.transitions_per_task=230"),
    (HARMODT + ["data.episode_length=0"], "data.episode_length=0"),
    (HARMODT + ["data.episode_length=600"], "data.episode_length=600"),
    (HARMODT + ["data.workers=0"], "data.workers=0"),
    (HARMODT + ["data.prompt_demos=-1"], "data.prompt_demos=-1"),
    (HARMODT + ["data.composition=mixed"], "data.composition='mixed'"),
    (HARMODT + ["data.unseen_tasks=[dial-turn-v3]"], "are training tasks too"),
    (HARMODT + ["data=ml45_tiny", "method=mtdt"], "has no embedding for tasks it never trained on"),
    (HARMODT + ["data=ml45_tiny", "eval.voting_threshold=0"], "eval.voting_threshold=0"),
    (HARMODT + ["data=ml45_tiny", "eval.voting_threshold=abc"], "eval.voting_threshold=abc"),
    (HARMODT + ["data.sampling.prompt_length=0"], "data.sampling.prompt_length >= 1"),
    (HARMODT + ["method=ta_harmodt_gating"], "belongs to recipe=g_harmodt"),
    (HARMODT + ["grouper=knn", "grouper.n_groups=1"], "the harmodt recipe trains one mask per task"),
    (HARMODT + ["train.gradient=magic"], "train.gradient='magic'"),
    (HARMODT + ["method=pcgrad", "train.tasks_per_step=0"], "train.tasks_per_step=0"),
    (HARMODT + ["method=cagrad", "train.cagrad_c=1"], "train.cagrad_c=1"),
    (HARMODT + ["method=pcgrad", "train.tasks_per_step=1"], "train.tasks_per_step=1"),
    (HARMODT + ["train.warmup_steps=-1"], "train.warmup_steps=-1"),
    (HARMODT + ["masking.update_every=50"], "masking.update_every=50 > train.steps=20"),
    # g_harmodt
    (G + ["gate.target=oracle"], "gate.target='oracle'"),
    (G + ["gate.probe_steps=3"], "gate.probe_steps=3: expected >= gate.transitions=5"),
    (G + ["gate.probe_steps=40"], "gate.probe_steps=40: expected < eval.max_steps=40"),
    (G + ["gate.lr=0"], "gate.lr=0"),
    (G + ["gate.steps=0"], "gate.steps=0"),
    (G + ["gate.blind=empty", "model.task_id=true", "model.prompt=false"], "gate.blind=empty"),
    (G + ["data.sampling.state_norm=task"], "data.sampling.state_norm=task"),
    (G + ["method=harmodt_f"], "method=harmodt_f"),
    (G + ["grouping.warmup_steps=0"], "grouping.warmup_steps=0: expected 0 < warmup"),
    (["recipe=g_harmodt", "grouper.n_groups=5", "data.tasks=[reach-v3,push-v3,pick-place-v3]"],
     "n_groups=5 exceeds the number of tasks"),
    (G + ["eval.episodes=0"], "eval.episodes=0"),
    (G + ["model.d_model=30"], "model.d_model=30"),
    # make_data
    (MAKE + ["data.workers=0"], "data.workers=0"),
    (MAKE + ["data.checkpoint_every=0"], "data.checkpoint_every=0"),
    (MAKE + ["data.tasks=[]"], "data.tasks=[]"),
    (MAKE + ["data.transitions_per_task=-5"], "data.transitions_per_task=-5"),
    (MAKE + ["format=parquet"], "format='parquet'"),
    (MAKE + ["format=minari", "minari_version=-1"], "minari_version=-1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_refused_before_anything_is_written(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        prepared(overrides, out)
    assert message in str(e.value), str(e.value)
    assert not out.exists()


# misspelled options of every group fail when the config is composed: nothing runs
TYPOS = [["method=harmodt_x"], ["profile=papr"], ["variant=dens"], ["debug=smok"], ["scorer=fisherr"],
         ["data=tinyy"], ["recipe=harmod"], ["initializer=erkk"], ["scheduler=cosin"], ["grouper=kn"],
         ["recipe=digits", "variant=dens"], ["scorer.lamda=3"], ["train.stepz=3"]]


@pytest.mark.parametrize("overrides", TYPOS, ids=[" ".join(o) for o in TYPOS])
def test_misspelled_option_or_key_fails_at_composition(overrides):
    with pytest.raises((HydraException, OmegaConfBaseException)) as e:
        composed(overrides)
    name = overrides[-1].split("=")[0]
    assert name.split(".")[-1] in str(e.value) or name in str(e.value), str(e.value)


def test_smoke_keeps_explicit_values_and_records_what_ran(tmp_path):
    _, cfg = prepared(HARMODT + ["model.d_model=64", "eval.episodes=2"], tmp_path / "run")
    assert cfg.model.d_model == 64 and cfg.eval.episodes == 2  # given on the command line: kept
    assert cfg.model.n_layer == 1 and cfg.eval.parallel == 1 and cfg.data.tasks == ["basketball-v3", "bin-picking-v3"]
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.model.d_model == 64 and saved.model.n_layer == 1 and saved.data.transitions_per_task == 200


def test_config_diff_lists_keys_and_leaves_safe_ones():
    old = {"seed": 0, "threads": 1, "train": {"lr": 1e-3, "steps": 10}, "gone": 1}
    new = {"seed": 1, "threads": 2, "train": {"lr": 1e-3, "steps": 20}, "added": {"x": 1}}
    assert config_diff(old, new, ["threads"]) == [
        "added.x: '<absent>' -> 1", "gone: 1 -> '<absent>'", "seed: 0 -> 1", "train.steps: 10 -> 20"]
    assert config_diff(old, old, []) == []


# ------------------------------------------------------------------------------ the command line

def run(*args: str, env: dict | None = None):
    """tools/run.py with these arguments; the caller checks the exit status."""
    return run_tool(*args, env=env, check=False)


def tree_digest(d: Path) -> dict[str, str]:
    """Every file under ``d`` (hidden ones included) with its content hash and mode."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,message", [
    (["recipe=digits", "train.lr=inf"], "error: train.lr=inf: expected a finite number > 0"),
    (["recipe=digits", "+foo=bar"], "error: +foo=bar: foo is not a key"),
    (["recipe=harmodt", "debug=smoke", "eval.episodes=0"], "error: eval.episodes=0"),
])
def test_command_line_error_is_one_line_and_leaves_no_folder(tmp_path, args, message):
    p = run(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


DIGITS_SMOKE = ["recipe=digits", "debug=smoke", "threads=1"]


@pytest.mark.slow
def test_finished_folder_is_never_changed(tmp_path):
    d = tmp_path / "run"
    first = run(*DIGITS_SMOKE, f"hydra.run.dir={d}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert {p.name for p in (d / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    before = tree_digest(d)
    for attempt in ([], ["seed=1"], ["scorer=magnitude"], ["train.steps=30"]):
        p = run(*DIGITS_SMOKE, *attempt, f"hydra.run.dir={d}")
        assert p.returncode == 2 and "already holds a finished run" in p.stderr, (attempt, p.stderr[-2000:])
    p = run("recipe=make_data", "debug=smoke", f"hydra.run.dir={d}", f"data_root={tmp_path / 'data'}")
    assert p.returncode == 2 and "already holds a finished run" in p.stderr
    assert not (tmp_path / "data").exists()
    p = run(*DIGITS_SMOKE, "dry_run=true", f"hydra.run.dir={d}")  # a dry run writes nothing anywhere
    assert p.returncode == 0, p.stderr[-2000:]
    assert tree_digest(d) == before


@pytest.mark.slow
def test_resume_under_another_config_is_refused_and_a_safe_key_may_change(tmp_path):
    d = tmp_path / "run"
    common = DIGITS_SMOKE + ["train.checkpoint_every=10", f"hydra.run.dir={d}"]
    killed = run(*common, env={"MASKMTL_KILL_AT_STEP": "13"})
    assert killed.returncode != 0 and (d / "checkpoint.pt").exists()
    before = tree_digest(d)
    for change, shown in ((["seed=1"], "seed: 0 -> 1"), (["scorer=magnitude"], "scorer._target_"),
                          (["train.steps=30"], "train.steps: 20 -> 30"), (["method=mtdt"], "method=mtdt")):
        p = run(*common, *change)
        assert p.returncode == 2 and shown in p.stderr, (change, p.stderr[-2000:])
    assert tree_digest(d) == before
    p = run(*[a for a in common if a != "threads=1"], "threads=2")  # resume_safe: threads may change
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((d / "results.json").read_text())
    assert r["resumed_from"] == 10 and r["config"]["threads"] == 2
    resumes = [json.loads(x) for x in (d / ".hydra" / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["state"] == "resume" and "threads=2" in resumes[0]["overrides"]
