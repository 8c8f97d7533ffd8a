"""The batched evaluator on the locomotion tasks: returns, no success signal, the data's action size,
early termination, and the recipe's config checks for this benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

pytest.importorskip("gymnasium")

from maskmtl import MaskSet, RandomInitializer, select_targets  # noqa: E402
from maskmtl.config import ConfigError  # noqa: E402
from recipes.harmodt.evaluate import GridPolicy, run_grid  # noqa: E402
from recipes.harmodt.model import PromptDT  # noqa: E402
from recipes.locomotion.envs import ACT_DIM, OBS_DIM, EvalEnv  # noqa: E402
from recipes.locomotion.tasks import task  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf"
K, KP, STEPS = 4, 3, 15


def setup(family: str, n_tasks: int = 2):
    torch.manual_seed(0)
    obs, act = OBS_DIM[family], ACT_DIM[family]
    model = PromptDT(obs, act, d_model=32, n_layer=1, n_head=4, dropout=0.0).eval()
    targets = select_targets(model, r".*weight", exclude=r".*ln.*|.*timestep.*")
    names = [f"{family}-{i}" for i in range(n_tasks)]
    masks = MaskSet(RandomInitializer(0.7).init_masks({t.name: t.shape for t in targets}, n_tasks,
                                                      torch.Generator().manual_seed(0)), names)
    g = torch.Generator().manual_seed(1)
    prompt = (torch.randn(n_tasks, KP, obs, generator=g), torch.randn(n_tasks, KP, act, generator=g).tanh(),
              torch.rand(n_tasks, KP, 1, generator=g), torch.arange(KP).repeat(n_tasks, 1),
              torch.ones(n_tasks, KP, dtype=torch.bool))
    return model, masks, prompt, names


def play(policy, names, rows, episodes, envs=None, steps=STEPS):
    family = names[0].rpartition("-")[0]
    envs = envs or [[EvalEnv(task(names[i]), steps) for _ in episodes] for i in rows]
    return run_grid(policy, envs, [names[i] for i in rows], rows, episodes, seed=3,
                    state_mean=np.zeros((len(rows), OBS_DIM[family])), state_std=np.ones((len(rows), OBS_DIM[family])),
                    rtg_target=np.full(len(rows), 100.0), reward_scale=1000.0, context=K, max_steps=steps,
                    stop_on_success=True, act_dim=ACT_DIM[family])


class Recorded:
    """A policy that records the actions it returned (grid rows x envs), to replay them."""

    def __init__(self, policy):
        self.policy, self.actions = policy, []

    def __call__(self, *args):
        out = self.policy(*args)
        self.actions.append(np.clip(out.float().numpy(), -1.0, 1.0))
        return out


@pytest.mark.parametrize("family", ["cheetah_vel", "ant_dir"])
def test_grid_return_is_the_episode_reward_sum_and_equals_sequential_play(family):
    model, masks, prompt, names = setup(family)
    policy = Recorded(GridPolicy(model, [0, 1], masks, prompt))
    batched = play(policy, names, [0, 1], [0, 1])
    assert len(batched.episodes) == 4 and all(e.success is None for e in batched.episodes)
    # no success signal: per-task results hold the return only
    assert all(set(v) == {"return", "episodes"} for v in batched.summarise().per_task.values())
    for e in batched.episodes:
        i = names.index(e.task)
        (s,) = play(GridPolicy(model, [i], masks, tuple(p[i:i + 1] for p in prompt)), names, [i], [e.episode]).episodes
        assert (s.seed, s.steps) == (e.seed, e.steps) and s.ret == pytest.approx(e.ret, rel=1e-5, abs=1e-6)
        # the same actions replayed on a fresh env reset with the episode's seed give the same return
        env = EvalEnv(task(e.task), STEPS)
        env.seed(e.seed)
        env.reset()
        ret = sum(env.step(policy.actions[t][i, e.episode])[1] for t in range(e.steps))
        assert ret == pytest.approx(e.ret, rel=1e-6)
    assert len({e.seed for e in batched.episodes}) == 4


class FallenAnt(EvalEnv):
    """An ant whose torso starts 5 m up, above the healthy heights [0.2, 1]: its first step
    terminates the episode."""

    def reset(self):
        obs, info = super().reset()
        qpos, qvel = self.env.data.qpos.copy(), self.env.data.qvel.copy()
        qpos[2] = 5.0
        return self.env.set_state(qpos, qvel), info


def test_terminated_episode_stops_and_counts_only_its_steps():
    model, masks, prompt, names = setup("ant_dir")
    policy = GridPolicy(model, [0, 1], masks, prompt)
    envs = [[FallenAnt(task(names[0]), STEPS)], [EvalEnv(task(names[1]), STEPS)]]
    rep = play(policy, names, [0, 1], [0], envs=envs)
    fallen, healthy = rep.episodes
    assert fallen.steps == 1 and healthy.steps == STEPS and rep.env_steps == 1 + STEPS


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["recipe=harmodt", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["data=cheetah_vel", "eval.max_steps=100"], "eval.max_steps=100: locomotion episodes are data.episode_length=200"),
    (["data=cheetah_vel", "data.eval_steps=150"], "eval.max_steps=150"),
    (["data=ant_dir", "data.sampling.hide_goal=true"], "data.sampling.hide_goal=true"),
    (["data=cheetah_vel", "method=mtdt"], "data.unseen_taskset=null"),
    (["data=cheetah_vel", "data.prompt_demos=0"], "data.prompt_demos must be >= 1"),
    (["data=cheetah_dir", "data.family=hopper"], "data.family='hopper'"),
    (["data=tiny", "eval.max_steps=501"], "eval.max_steps=501: expected an integer in 1..500"),
])
def test_bad_locomotion_config_names_its_key(overrides, message):
    from recipes.harmodt.train import check_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_config(_cfg(*overrides))


@pytest.mark.parametrize("family", ["cheetah_vel", "cheetah_dir", "ant_dir"])
def test_default_config_passes_and_mtdt_runs_on_training_tasks_only(family):
    from recipes.harmodt.train import check_config

    cfg = _cfg(f"data={family}")
    check_config(cfg)
    assert cfg.eval.max_steps == cfg.data.episode_length == 200
    check_config(_cfg(f"data={family}", "method=mtdt", "data.unseen_taskset=null"))


def test_smoke_sizes_keep_data_and_evaluation_episodes_equal():
    from recipes.harmodt.train import smoke_overrides

    out = smoke_overrides(_cfg("data=ant_dir"))
    assert out["data.episode_length"] == 10 and "eval.max_steps" not in out  # eval.max_steps follows the data
    assert out["data.tasks"] == ["ant_dir-0", "ant_dir-1"] and out["data.unseen_tasks"] == ["ant_dir-6"]


def test_g_harmodt_refuses_locomotion_data_naming_the_benchmark():
    from recipes.g_harmodt.train import check_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=g_harmodt", "data=ant_dir"])
    with pytest.raises(ConfigError, match="data.benchmark=locomotion .*reads Meta-World data only"):
        check_config(cfg)
