"""A behaviour source for the locomotion tasks: MPPI planning on the true simulator.

At every control step the planner samples ``samples`` open-loop action sequences of ``horizon``
steps around its current plan (Gaussian noise of std ``noise``, clipped to [-1, 1]), rolls all
of them out from the exact simulator state with ``mujoco.rollout`` (same model, same frame skip),
scores each by the task's reward summed over the horizon, and moves the plan to the
exponentially weighted mean (MPPI, Williams et al. 2017; weights exp((R - max R) / (λ·std R)),
λ = ``temperature``). The first action of the plan is executed (plus ``action_noise``), the plan
is shifted by one step and the loop repeats. No learning, so no training run per family.

The planning objective is the task reward of :mod:`recipes.locomotion.envs`, computed from the
rolled-out states, except for the ant's contact cost (``cfrc_ext`` is not part of the rolled-out
state; the term is at most 0.042 per step), the ant's position (final qpos instead of the torso's
xpos, see ``_returns``), a penalty of ``unhealthy_penalty`` for rolling out of the ant's healthy
height range (whose steps then stop earning), and for the cheetah a cost of ``pitch_weight``·pitch²
per step: without it the planner, seeing 1 s ahead, flips the cheetah onto its back at high
target speeds and runs there, unsteadily. The rewards stored in the data are always the
environment's.

Sub-optimal behaviour comes from the same planner with fewer samples, a shorter horizon and
more action noise (``PlannerConfig`` fields), so one planner covers the whole quality range.

Measured (one thread on a shared 2-core machine, one measurement running at a time (the same
episode took 2-3× longer next to a second one), mujoco 3.3.0, gymnasium 1.4.0, ``EXPERT``
settings, seed 0; ``python -m recipes.locomotion.expert <tasks> [--episodes E] [--composition C]``),
return per 200-step episode and seconds per episode:

=================  ======  ==========================================  =====================
task               goal    expert return                               s / episode
=================  ======  ==========================================  =====================
cheetah_vel-2      0.225   -26.9                                       11.3
cheetah_vel-7      0.600   -45.3                                       12.1
cheetah_vel-15     1.200   -47.2; 6 episodes: mean -50.2 (-47.2..-54.1)  12.9
cheetah_vel-23     1.800   -58.0                                       13.1
cheetah_vel-26     2.025   -67.3                                       15.8
cheetah_vel-39     3.000   -95.7                                       10.4
cheetah_dir-0      +1      838.6                                       14.4
cheetah_dir-1      -1      1070.1                                      14.2
ant_dir-6          0.245   631.1                                       96.6
=================  ======  ==========================================  =====================

Twice the samples (128) gave -44.3 / -90.2 on cheetah_vel-15 / -39 in twice the time (22 s), so
64 is kept. Mean over Cheetah-vel's five test tasks: -48.9 (papers, learned policies on unseen tasks:
Prompt-DT -127.7, MTDT -170.1, HarmoDT-F -66.5); Cheetah-dir mean 954 (935.3 / 662.4 / 958.5);
Ant-dir one task 631 (278.7 / 165.3 / 298.3). The sub-optimal sweep's first half costs 0.8 s per
episode and returns -115..-206 on cheetah_vel-15 and -414..-542 on cheetah_vel-39 (doing nothing:
-240 and -600). Projection for the default Cheetah-vel data (35 training tasks × 5 expert
episodes + 1 prompt demonstration for each of the 40 tasks = 215 episodes): at 13 s per episode
~2800 CPU-seconds, ~23 min on 2 cores; from one task made end to end by ``recipe=make_data``
(5 episodes + 1 demonstration in 95 s, cheetah_vel-14, mean return -48.9) ~3400 CPU-seconds,
~28 min. Not yet run in full. The ant is ~7× slower per episode (RK4 integrator, 8
actuators, more contacts): its default data would take hours with these settings. Smaller
planners for the ant, one episode each on ant_dir-6 / ant_dir-17 (so noisy): 16 × 10 steps,
378.5 / 274.9 in 11-12 s; 32 × 10 steps, 238.2 / 677.9 in 22-27 s. Not yet tuned.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

from recipes.locomotion.envs import ANT_CTRL, ANT_HEALTHY_Z, ANT_SURVIVE, CHEETAH_CTRL, LocomotionEnv
from recipes.locomotion.tasks import Task

_SPEC = mujoco.mjtState.mjSTATE_FULLPHYSICS  # [time, qpos, qvel, act, ...]


@dataclass(frozen=True)
class PlannerConfig:
    samples: int = 64          # K: action sequences per control step
    horizon: int = 20          # H: control steps per sequence
    noise: float = 0.5         # std of the sampling noise around the plan
    temperature: float = 0.2   # λ, in units of the std of the sampled returns
    knot_every: int = 3        # noise drawn at every k-th step and linearly interpolated between (1: every step)
    action_noise: float = 0.0  # std of Gaussian noise on the executed action (sub-optimal data)
    unhealthy_penalty: float = 100.0  # ant: once, for rolling out of the healthy height range
    pitch_weight: float = 0.5  # cheetah: each rollout step costs pitch_weight·pitch² (qpos[2], rad)

    def __post_init__(self):
        for key in ("samples", "horizon", "knot_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"planner.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("noise", "temperature", "action_noise", "unhealthy_penalty", "pitch_weight"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"planner.{key} must be a finite number >= 0, got {v!r}")
        if self.temperature <= 0:
            raise ValueError(f"planner.temperature must be > 0, got {self.temperature}")


class MPPIPlanner:
    """MPPI on an :class:`LocomotionEnv`'s model; ``act(env)`` plans from the env's current state."""

    def __init__(self, task: Task, model: mujoco.MjModel, frame_skip: int, cfg: PlannerConfig,
                 rng: np.random.Generator):
        self.task, self.model, self.cfg, self.rng = task, model, cfg, rng
        self.fs = int(frame_skip)
        self.dt = float(model.opt.timestep * self.fs)
        self.nu = model.nu
        self.scratch = mujoco.MjData(model)
        self.state = np.zeros(mujoco.mj_stateSize(model, _SPEC))
        self.plan = np.zeros((cfg.horizon, self.nu))
        self._out = np.zeros((cfg.samples, cfg.horizon * self.fs, self.state.size))
        # Linear interpolation from knots at steps 0, k, 2k, ... (and the last step) to every step.
        knots = np.unique(np.r_[np.arange(0, cfg.horizon, cfg.knot_every), cfg.horizon - 1])
        eye = np.eye(len(knots))
        self._interp = np.stack([np.interp(np.arange(cfg.horizon), knots, eye[j]) for j in range(len(knots))], 1)

    def _returns(self, states: np.ndarray, actions: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """Summed reward of each rollout; states (K, H·fs, nstate) per substep, actions (K, H, nu)."""
        frames = states[:, self.fs - 1::self.fs]                      # (K, H, nstate): after each control step
        ctrl = np.sum(actions * actions, axis=2)                      # (K, H)
        if self.task.family == "ant_dir":
            # qpos[0:2] = the torso's x, y (free joint). The env reads the torso's xpos, which with
            # the ant's RK4 integrator is the last RK stage's kinematics, not the final state; the
            # difference telescopes, so a horizon's sum is off by (qpos_H - xpos_H)·u / dt only.
            xy = frames[:, :, 1:3]
            prev = np.concatenate([np.broadcast_to(x0, (xy.shape[0], 1, 2)), xy[:, :-1]], axis=1)
            vel = (xy - prev) / self.dt
            g = self.task.goal
            r = vel @ np.array([math.cos(g), math.sin(g)]) - ANT_CTRL * ctrl + ANT_SURVIVE
            z = frames[:, :, 3]                                       # qpos[2]
            bad = (z < ANT_HEALTHY_Z[0]) | (z > ANT_HEALTHY_Z[1])
            dead = np.cumsum(bad, axis=1) > 0                         # from the first unhealthy step on
            r = np.where(dead, 0.0, r)
            return r.sum(1) - self.cfg.unhealthy_penalty * dead.any(1)
        x = frames[:, :, 1]                                           # qpos[0]
        prev = np.concatenate([np.full((x.shape[0], 1), x0), x[:, :-1]], axis=1)
        vel = (x - prev) / self.dt
        fwd = -np.abs(vel - self.task.goal) if self.task.family == "cheetah_vel" else self.task.goal * vel
        pitch = frames[:, :, 3]                                       # qpos[2]: rooty
        return (fwd - CHEETAH_CTRL * ctrl - self.cfg.pitch_weight * pitch * pitch).sum(1)

    def act(self, env: LocomotionEnv) -> np.ndarray:
        cfg = self.cfg
        mujoco.mj_getState(self.model, env.data, self.state, _SPEC)
        x0 = env.data.qpos[0:2].copy() if self.task.family == "ant_dir" else float(env.data.qpos[0])
        eps = self._interp @ self.rng.normal(0.0, cfg.noise, (cfg.samples, self._interp.shape[1], self.nu))
        eps[0] = 0.0                                                  # the current plan is always a candidate
        actions = np.clip(self.plan[None] + eps, -1.0, 1.0)
        controls = np.repeat(actions, self.fs, axis=1)
        mj_rollout.rollout(self.model, self.scratch, self.state[None], controls, state=self._out,
                           nstep=controls.shape[1], initial_warmstart=env.data.qacc_warmstart[None])
        ret = self._returns(self._out, actions, x0)
        w = np.exp((ret - ret.max()) / (cfg.temperature * (ret.std() + 1e-8)))
        self.plan = np.tensordot(w / w.sum(), actions, axes=1)
        a = self.plan[0].copy()
        self.plan = np.concatenate([self.plan[1:], self.plan[-1:]])
        if cfg.action_noise > 0:
            a = a + self.rng.normal(0.0, cfg.action_noise, self.nu)
        return np.clip(a, -1.0, 1.0)


def run_episode(env: LocomotionEnv, cfg: PlannerConfig, seed: int) -> dict:
    """One episode of the planner from ``env.reset(seed)``; arrays as :class:`TaskData` wants them."""
    rng = np.random.default_rng([int(seed), 1])
    planner = MPPIPlanner(env.task, env.model, env.frame_skip, cfg, rng)
    obs = env.reset(seed=int(seed))
    observations, actions, rewards = [], [], []
    t0 = time.perf_counter()
    while True:
        a = planner.act(env)
        observations.append(obs)
        actions.append(a.astype(np.float32))
        obs, r, terminated, truncated, _ = env.step(a)
        rewards.append(r)
        if terminated or truncated:
            break
    return {"observations": np.stack(observations), "actions": np.stack(actions),
            "rewards": np.asarray(rewards, np.float32), "seconds": time.perf_counter() - t0,
            "return": float(np.sum(rewards)), "planner": asdict(cfg)}


# -- datasets ---------------------------------------------------------------------------------

GENERATOR = "mppi"
GENERATOR_VERSION = 1
EXPERT = PlannerConfig(samples=64, horizon=20, noise=0.5, temperature=0.2, knot_every=3)
WEAKEST = PlannerConfig(samples=4, horizon=5, noise=0.5, temperature=0.2, knot_every=3, action_noise=0.5)


def schedule(n_episodes: int, weakest: PlannerConfig = WEAKEST, expert: PlannerConfig = EXPERT) -> list[PlannerConfig]:
    """Planner settings for episodes 0..E-1, weakest → expert (a replay buffer's random → expert sweep).

    At progress f = i / (E - 1): samples and horizon move geometrically from ``weakest`` to
    ``expert``, action noise linearly; the last episode is the expert. ``sub_optimal`` data is the
    first half of the same sequence.
    """
    if n_episodes < 1:
        raise ValueError(f"episodes per task must be >= 1, got {n_episodes}")
    out = []
    for i in range(n_episodes):
        f = i / (n_episodes - 1) if n_episodes > 1 else 1.0
        geo = lambda a, b: int(round(a * (b / a) ** f))
        out.append(PlannerConfig(
            samples=geo(weakest.samples, expert.samples), horizon=geo(weakest.horizon, expert.horizon),
            noise=expert.noise, temperature=expert.temperature, knot_every=expert.knot_every,
            action_noise=weakest.action_noise + f * (expert.action_noise - weakest.action_noise),
            unhealthy_penalty=expert.unhealthy_penalty, pitch_weight=expert.pitch_weight))
    return out


def composition_configs(composition: str, episodes: int) -> list[PlannerConfig]:
    """``near_optimal``: E expert episodes (Prompt-DT trains on expert data, ``dataset_mode='expert'``);
    ``sub_optimal``: the first E of a 2E-episode weakest → expert :func:`schedule` (as the papers'
    sub-optimal Meta-World data is the first half of a replay buffer)."""
    if composition == "near_optimal":
        return [EXPERT] * int(episodes)
    if composition == "sub_optimal":
        return schedule(2 * int(episodes))[: int(episodes)]
    raise ValueError(f"data.composition={composition!r}: expected near_optimal or sub_optimal")


def episode_seed(seed: int, task: Task, episode: int, stream: int = 0) -> int:
    """A task's episode seeds depend on (seed, family, task index, episode, stream) only (stream 1: demos)."""
    from recipes.locomotion.tasks import FAMILIES

    ss = np.random.SeedSequence([int(seed), FAMILIES.index(task.family), task.index, int(episode), int(stream)])
    return int(ss.generate_state(1)[0])


def generate_task(task: Task, configs: list[PlannerConfig], seed: int, stream: int = 0,
                  max_steps: int | None = None, progress=None):
    """One task's episodes, one per planner config, as :class:`~recipes.metaworld.storage.TaskData`."""
    import gymnasium
    from recipes.metaworld.storage import TaskData

    env = LocomotionEnv(task) if max_steps is None else LocomotionEnv(task, max_steps=max_steps)
    episodes, meta = [], []
    for i, cfg in enumerate(configs):
        ep = run_episode(env, cfg, episode_seed(seed, task, i, stream))
        episodes.append(ep)
        meta.append({"return": ep["return"], "seconds": round(ep["seconds"], 3), "planner": ep["planner"]})
        if progress is not None:
            progress(task, i, ep)
    provenance = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "task": task.name,
                  "family": task.family, "goal": task.goal, "seed": int(seed), "stream": int(stream),
                  "episode_length": env.max_steps, "episodes": meta,
                  "versions": {"mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__,
                               "numpy": np.__version__}}
    return TaskData.from_episodes(task.name, episodes, provenance=provenance)


def main(argv=None) -> None:
    """Measure the planner: ``python -m recipes.locomotion.expert cheetah_vel-2 cheetah_vel-39 --episodes 1``."""
    import argparse

    from recipes.locomotion.tasks import task as make_task

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--episodes", type=int, default=1, help="episodes per task")
    ap.add_argument("--composition", default="near_optimal", choices=("near_optimal", "sub_optimal"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    total, returns = 0.0, []
    for name in args.tasks:
        t = make_task(name)
        data = generate_task(t, composition_configs(args.composition, args.episodes), args.seed,
                             progress=lambda t, i, ep: print(
                                 f"{t.name} goal={t.goal:.3f} episode={i} samples={ep['planner']['samples']} "
                                 f"horizon={ep['planner']['horizon']} return={ep['return']:.1f} "
                                 f"seconds={ep['seconds']:.1f}", flush=True))
        total += sum(e["seconds"] for e in data.provenance["episodes"])
        returns.extend(data.episode_returns().tolist())
    print(f"episodes: {len(returns)}, mean return {np.mean(returns):.1f}, "
          f"seconds: {total:.1f} total, {total / len(returns):.1f} per episode")


if __name__ == "__main__":
    main()
