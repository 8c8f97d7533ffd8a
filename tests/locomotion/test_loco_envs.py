"""Locomotion rewards against hand-computed states, termination, observations, and the planner's model."""

from __future__ import annotations

import copy
import math

import mujoco
import numpy as np
import pytest

from recipes.locomotion.envs import LocomotionEnv
from recipes.locomotion.expert import MPPIPlanner, PlannerConfig, run_episode
from recipes.locomotion.tasks import Task, task

pytest.importorskip("gymnasium")


def airborne(env: LocomotionEnv, vel_xy, height: float) -> None:
    """No gravity, body lifted clear of the floor, joints at rest: the root keeps its velocity exactly."""
    env.reset(seed=0)
    env.model.opt.gravity[:] = 0.0
    qpos, qvel = env.model.qpos0.copy(), np.zeros(env.model.nv)
    if env.family == "ant_dir":
        qpos[2] = height
        qvel[0:2] = vel_xy
    else:
        qpos[1] = height          # rootz (slide joint, relative to its rest height)
        qvel[0] = vel_xy[0]       # rootx
    env.set_state(qpos, qvel)


@pytest.mark.parametrize("goal", [0.3, 1.7, 2.925])
def test_cheetah_vel_reward_by_hand(goal):
    env = LocomotionEnv(Task("cheetah_vel", 0, goal))
    airborne(env, (1.7,), 2.0)
    _, r, term, trunc, info = env.step(np.zeros(6))
    assert info["forward_vel"] == pytest.approx(1.7, abs=1e-9)
    assert r == pytest.approx(-abs(1.7 - goal), abs=1e-9) and not term and not trunc


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_cheetah_dir_reward_by_hand(direction):
    env = LocomotionEnv(Task("cheetah_dir", 0 if direction > 0 else 1, direction))
    airborne(env, (-0.8,), 2.0)
    _, r, _, _, info = env.step(np.zeros(6))
    assert r == pytest.approx(direction * -0.8, abs=1e-9) and info["reward_ctrl"] == 0.0


@pytest.mark.parametrize("angle", [0.0, math.pi / 3, 4.5])
def test_ant_dir_reward_by_hand(angle):
    env = LocomotionEnv(Task("ant_dir", 0, angle))
    airborne(env, (0.3, -0.4), 0.6)
    _, r, term, _, info = env.step(np.zeros(8))
    assert np.allclose(info["xy_vel"], [0.3, -0.4], atol=1e-9)
    assert info["reward_contact"] == 0.0 and not term          # in the air: no contact forces
    assert r == pytest.approx(0.3 * math.cos(angle) - 0.4 * math.sin(angle) + 1.0, abs=1e-9)


def replay(env: LocomotionEnv, before: mujoco.MjData, action) -> mujoco.MjData:
    """The same step on a copy of the simulator state taken before it (frame skip 5, then the
    post-constraint forces that fill cfrc_ext)."""
    d = copy.copy(before)
    d.ctrl[:] = action
    mujoco.mj_step(env.model, d, nstep=5)
    mujoco.mj_rnePostConstraint(env.model, d)
    return d


@pytest.mark.parametrize("name", ["cheetah_vel-7", "cheetah_dir-1", "ant_dir-17"])
def test_reward_with_contacts_and_action(name):
    """From a state on the floor, with a non-zero action: the formula on an independent replay."""
    t = task(name)
    env = LocomotionEnv(t)
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(10):                                  # land and get moving
        env.step(rng.uniform(-1, 1, env.act_dim))
    before = copy.copy(env.data)
    qpos = before.qpos.copy()
    a = rng.uniform(-1, 1, env.act_dim)
    _, r, _, _, info = env.step(a)
    d = replay(env, before, a)
    dt = 0.05
    if t.family == "ant_dir":
        torso = env.model.body("torso").id             # xpos, as Prompt-DT's get_body_com
        vel = (d.xpos[torso, :2] - before.xpos[torso, :2]) / dt
        contact = 0.5e-3 * np.sum(np.clip(d.cfrc_ext, -1, 1) ** 2)
        assert contact > 0                               # standing on the floor
        expected = vel @ [math.cos(t.goal), math.sin(t.goal)] - 0.5 * np.sum(a ** 2) - contact + 1.0
        assert info["reward_ctrl"] == pytest.approx(-0.5 * np.sum(a ** 2))
    else:
        vel = (d.qpos[0] - qpos[0]) / dt
        fwd = -abs(vel - t.goal) if t.family == "cheetah_vel" else t.goal * vel
        expected = fwd - 0.05 * np.sum(a ** 2)
        assert info["reward_ctrl"] == pytest.approx(-0.05 * np.sum(a ** 2))
    assert r == pytest.approx(expected, abs=1e-9)


def test_ant_terminates_outside_healthy_height():
    env = LocomotionEnv(task("ant_dir-0"))
    for z, done in ((0.1, True), (0.55, False), (1.5, True)):
        env.reset(seed=0)
        qpos = env.model.qpos0.copy()
        qpos[2] = z
        env.set_state(qpos, np.zeros(env.model.nv))
        env.model.opt.gravity[:] = 0.0
        env.model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_CONSTRAINT   # z stays where it is put
        _, _, term, trunc, _ = env.step(np.zeros(8))
        assert env.data.qpos[2] == pytest.approx(z)
        assert term == done and not trunc


def test_observations_and_episode_length():
    for name, dim in (("cheetah_vel-0", 20), ("ant_dir-0", 27)):
        env = LocomotionEnv(task(name), max_steps=200)
        o = env.reset(seed=1)
        assert o.shape == (dim,) and o.dtype == np.float32
        if dim == 20:
            d = env.data
            assert np.allclose(o, np.concatenate([d.qpos[1:], d.qvel, d.xpos[env.model.body("torso").id]]), atol=1e-6)
        assert np.array_equal(o, env.reset(seed=1)) and not np.array_equal(o, env.reset(seed=2))
    env = LocomotionEnv(task("cheetah_vel-0"))
    env.reset(seed=0)
    flags = [env.step(np.zeros(6))[3] for _ in range(200)]
    assert flags[-1] and not any(flags[:-1])
    with pytest.raises(ValueError, match="action must be 6 finite"):
        env.step([0.0] * 5)
    with pytest.raises(ValueError, match="max_steps"):
        LocomotionEnv(task("cheetah_vel-0"), max_steps=0)


@pytest.mark.parametrize("name", ["cheetah_vel-39", "cheetah_dir-1", "ant_dir-6"])
def test_planner_objective_matches_env_rewards(name):
    """The planner scores rollouts with the env's reward (the ant: up to the contact term)."""
    t = task(name)
    env = LocomotionEnv(t)
    env.reset(seed=0)
    cfg = PlannerConfig(samples=1, horizon=8, pitch_weight=0.0)   # the one planning-only term, off
    p = MPPIPlanner(t, env.model, env.frame_skip, cfg, np.random.default_rng(0))
    acts = np.random.default_rng(1).uniform(-1, 1, (1, 8, env.act_dim))
    state = np.zeros(mujoco.mj_stateSize(env.model, mujoco.mjtState.mjSTATE_FULLPHYSICS))
    mujoco.mj_getState(env.model, env.data, state, mujoco.mjtState.mjSTATE_FULLPHYSICS)
    x0 = env.data.qpos[0:2].copy() if t.family == "ant_dir" else float(env.data.qpos[0])
    out = np.zeros((1, 40, state.size))
    from mujoco import rollout
    rollout.rollout(env.model, mujoco.MjData(env.model), state[None], np.repeat(acts, 5, axis=1), state=out,
                    initial_warmstart=env.data.qacc_warmstart[None])
    planned = p._returns(out, acts, x0)[0]
    got = [env.step(a)[4] for a in acts[0]]
    contact = sum(i.get("reward_contact", 0.0) for i in got)
    total = sum(i["reward_forward"] + i["reward_ctrl"] + i.get("reward_survive", 0.0) for i in got)
    if t.family == "ant_dir":
        # the planner reads the final qpos, the env the torso's xpos (RK4's last stage); the
        # per-step differences telescope to the last step's gap
        u = np.array([math.cos(t.goal), math.sin(t.goal)])
        total += (env.data.qpos[0:2] - env.torso_xy()) @ u / env.dt
        assert 0 < -contact < 0.042 * 8
    assert planned == pytest.approx(total, abs=1e-6)


def test_planner_beats_doing_nothing():
    env = LocomotionEnv(task("cheetah_vel-39"), max_steps=25)
    ep = run_episode(env, PlannerConfig(samples=16, horizon=8), seed=0)
    env.reset(seed=0)
    idle = sum(env.step(np.zeros(6))[1] for _ in range(25))
    assert ep["observations"].shape == (25, 20) and ep["actions"].shape == (25, 6)
    assert np.abs(ep["actions"]).max() <= 1.0
    assert ep["return"] == pytest.approx(float(ep["rewards"].sum()), rel=1e-5) and ep["return"] > idle + 5
    with pytest.raises(ValueError, match="planner.samples"):
        PlannerConfig(samples=0)
    with pytest.raises(ValueError, match="planner.temperature"):
        PlannerConfig(temperature=0.0)


def test_schedule_and_compositions():
    from recipes.locomotion.expert import EXPERT, WEAKEST, composition_configs, schedule

    s = schedule(6)
    assert s[0].samples == WEAKEST.samples and s[0].horizon == WEAKEST.horizon
    assert s[-1] == EXPERT and s[0].action_noise == WEAKEST.action_noise
    assert [c.samples for c in s] == sorted(c.samples for c in s)
    assert composition_configs("near_optimal", 3) == [EXPERT] * 3
    assert composition_configs("sub_optimal", 3) == schedule(6)[:3]
    with pytest.raises(ValueError, match="data.composition='medium'"):
        composition_configs("medium", 3)
    with pytest.raises(ValueError, match="episodes per task"):
        schedule(0)


def test_generate_task_reproducible_and_stored(tmp_path):
    from recipes.locomotion.expert import episode_seed, generate_task
    from recipes.metaworld.storage import load_task, read_sidecar, save_task

    t = task("cheetah_vel-2")
    cfgs = [PlannerConfig(samples=4, horizon=3, action_noise=0.3), PlannerConfig(samples=6, horizon=4)]
    a = generate_task(t, cfgs, seed=7, max_steps=10)
    b = generate_task(t, cfgs, seed=7, max_steps=10)
    c = generate_task(t, cfgs, seed=7, stream=1, max_steps=10)
    assert a.n_episodes == 2 and a.n_transitions == 20 and (a.obs_dim, a.act_dim) == (20, 6)
    assert np.array_equal(a.observations, b.observations) and np.array_equal(a.actions, b.actions)
    assert not np.array_equal(a.observations, c.observations)
    assert np.allclose([e["return"] for e in a.provenance["episodes"]], a.episode_returns(), atol=1e-4)
    assert a.provenance["goal"] == t.goal and a.provenance["episodes"][1]["planner"]["samples"] == 6
    assert len({episode_seed(7, t, i, s) for i in range(3) for s in range(2)}) == 6
    save_task(tmp_path, a)
    back = load_task(tmp_path, t.name, obs_dim=20, act_dim=6)
    assert np.array_equal(back.rewards, a.rewards) and read_sidecar(tmp_path, t.name)["provenance"]["family"] == "cheetah_vel"
