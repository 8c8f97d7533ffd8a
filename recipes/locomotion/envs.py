"""The three task families on gymnasium's MuJoCo ``HalfCheetah-v5`` and ``Ant-v5``.

The simulation (model, frame skip 5, dt 0.05 s, reset noise: qpos + U(-0.1, 0.1), qvel +
0.1·N(0, 1)) is gymnasium's; the observation, reward and termination are Prompt-DT's
(``envs/mujoco-control-envs/mujoco_control_envs/tp_envs/`` in ``mxu34/prompt-dt``, which adapts
MAML's rllab environments ``half_cheetah_env_rand{,_direc}.py`` and PEARL's ``ant_dir.py``;
MACAW's ``src/tp_envs/`` in ``eric-mitchell/macaw`` has the same reward code).
With a = the action and dt = 0.05:

``cheetah_vel`` (``half_cheetah_vel.py``)::

    v = (x_after - x_before) / dt                  x = qpos[0], the root's x position
    r = -|v - goal_velocity| - 0.05 · Σ a²          (ctrl_cost = 0.5 · 1e-1 · Σ a²)

``cheetah_dir`` (``half_cheetah_dir.py``)::

    r = direction · v - 0.05 · Σ a²                 direction ∈ {+1, -1}

``ant_dir`` (``ant_dir.py``)::

    u = (xy_after - xy_before) / dt                 torso body position x, y (``xpos``, as
                                                    Prompt-DT's get_body_com and gymnasium read it)
    r = u · (cos θ, sin θ) - 0.5 · Σ a² - 0.5e-3 · Σ clip(cfrc_ext, -1, 1)² + 1.0

    terminated when the state is not finite or the torso height qpos[2] leaves [0.2, 1.0].

Cheetah episodes never terminate; every episode is truncated at 200 steps (Prompt-DT's
``max_ep_len``). Observations are Prompt-DT's: cheetah 20-d = qpos[1:] (8), qvel (9), torso
position (3); ant 27-d = qpos[2:] (13), qvel (14). The control cost uses the action as given
(MuJoCo clamps the applied control to [-1, 1]), as in Prompt-DT.

Differences from Prompt-DT's environments, all in the simulator and not the task: MuJoCo 3 with
gymnasium's model files instead of mujoco-py 1.5/2.0 with rllab/PEARL's; and ``cfrc_ext`` is
computed (``mj_rnePostConstraint`` after each step), whereas under mujoco-py ≥ 2.0 it stays zero
(openai/gym#1541), so Prompt-DT's Ant-dir rewards likely had no contact cost. The term is at most
0.5e-3 · 84 = 0.042 per step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from recipes.locomotion.tasks import EPISODE_LENGTH, Task

CHEETAH_CTRL = 0.05
ANT_CTRL, ANT_CONTACT, ANT_SURVIVE = 0.5, 0.5e-3, 1.0
ANT_HEALTHY_Z = (0.2, 1.0)
OBS_DIM = {"cheetah_vel": 20, "cheetah_dir": 20, "ant_dir": 27}
ACT_DIM = {"cheetah_vel": 6, "cheetah_dir": 6, "ant_dir": 8}


def make_gym_env(family: str):
    """The unwrapped gymnasium MuJoCo environment a family runs on (its model and data are used as is)."""
    import gymnasium as gym

    if family in ("cheetah_vel", "cheetah_dir"):
        return gym.make("HalfCheetah-v5").unwrapped
    if family == "ant_dir":
        return gym.make("Ant-v5", include_cfrc_ext_in_observation=False).unwrapped
    raise ValueError(f"unknown locomotion family {family!r}")


class LocomotionEnv:
    """One task of a family. ``reset(seed)`` → obs; ``step(a)`` → ``(obs, reward, terminated, truncated, info)``.

    ``info`` holds the reward terms (``reward_forward``, ``reward_ctrl``, and for ant
    ``reward_contact``, ``reward_survive``) and the measured velocity (``forward_vel`` for the
    cheetah, ``xy_vel`` for the ant).
    """

    def __init__(self, task: Task, max_steps: int = EPISODE_LENGTH):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.task = task
        self.family = task.family
        self.max_steps = int(max_steps)
        self.gym_env = make_gym_env(self.family)
        self.model, self.data = self.gym_env.model, self.gym_env.data
        self.frame_skip = self.gym_env.frame_skip
        self.dt = float(self.model.opt.timestep * self.frame_skip)
        self._torso = self.model.body("torso").id
        self.obs_dim, self.act_dim = OBS_DIM[self.family], ACT_DIM[self.family]
        self._t = 0

    # -- state -------------------------------------------------------------------------------
    def observation(self) -> np.ndarray:
        d = self.data
        if self.family == "ant_dir":
            parts = (d.qpos[2:], d.qvel)
        else:
            parts = (d.qpos[1:], d.qvel, d.xpos[self._torso])
        return np.concatenate(parts).astype(np.float32)

    def torso_xy(self) -> np.ndarray:
        """The torso's x, y as the ant's reward reads them (``xpos``: as of the last substep's start)."""
        return self.data.xpos[self._torso, :2].copy()

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.gym_env.reset(seed=seed)
        self._t = 0
        return self.observation()

    def set_state(self, qpos, qvel) -> np.ndarray:
        """Put the simulator in (qpos, qvel) (forward kinematics recomputed); returns the observation."""
        self.gym_env.set_state(np.asarray(qpos, np.float64), np.asarray(qvel, np.float64))
        return self.observation()

    # -- dynamics ----------------------------------------------------------------------------
    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (self.act_dim,) or not np.isfinite(a).all():
            raise ValueError(f"{self.task.name}: action must be {self.act_dim} finite numbers, got {action!r}")
        d = self.data
        before = d.xpos[self._torso, :2].copy() if self.family == "ant_dir" else float(d.qpos[0])
        self.gym_env.do_simulation(a, self.frame_skip)
        self._t += 1
        terminated = False
        if self.family == "ant_dir":
            xy_vel = (d.xpos[self._torso, :2] - before) / self.dt
            goal = self.task.goal
            forward = float(xy_vel @ np.array([math.cos(goal), math.sin(goal)]))
            ctrl = ANT_CTRL * float(np.sum(a * a))
            contact = ANT_CONTACT * float(np.sum(np.square(np.clip(d.cfrc_ext, -1.0, 1.0))))
            reward = forward - ctrl - contact + ANT_SURVIVE
            state = np.concatenate([d.qpos, d.qvel])
            terminated = not (np.isfinite(state).all() and ANT_HEALTHY_Z[0] <= d.qpos[2] <= ANT_HEALTHY_Z[1])
            info = {"reward_forward": forward, "reward_ctrl": -ctrl, "reward_contact": -contact,
                    "reward_survive": ANT_SURVIVE, "xy_vel": xy_vel.copy()}
        else:
            vel = (float(d.qpos[0]) - before) / self.dt
            if self.family == "cheetah_vel":
                forward = -abs(vel - self.task.goal)
            else:
                forward = self.task.goal * vel
            ctrl = CHEETAH_CTRL * float(np.sum(a * a))
            reward = forward - ctrl
            info = {"reward_forward": forward, "reward_ctrl": -ctrl, "forward_vel": vel}
        truncated = self._t >= self.max_steps and not terminated
        return self.observation(), float(reward), bool(terminated), bool(truncated), info


class EvalEnv:
    """A :class:`LocomotionEnv` as the batched evaluator (``recipes.harmodt.evaluate.run_grid``)
    drives environments: ``seed(s)`` fixes the next reset's noise, ``reset()`` returns
    ``(obs, info)``, ``step`` is the task's own (``info`` has no ``"success"``: these tasks are
    scored by their return)."""

    def __init__(self, task: Task, max_steps: int = EPISODE_LENGTH):
        self.env = LocomotionEnv(task, max_steps)
        self.action_space = self.env.gym_env.action_space
        self._seed: int | None = None

    def seed(self, seed: int) -> None:
        self._seed = int(seed)

    def reset(self) -> tuple[np.ndarray, dict]:
        return self.env.reset(self._seed), {}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        return self.env.step(action)
