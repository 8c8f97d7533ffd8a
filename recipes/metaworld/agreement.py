"""Does maskmtl's batched evaluator agree with Meta-World's own evaluation?

The check plays one deterministic policy twice, and compares episode by episode:

1. through ``metaworld.evaluation.evaluation`` on ``gymnasium.make_vec("Meta-World/custom-mt-envs",
   envs_list=tasks, seed=seed)`` (Meta-World's vector env, one env per task, its own goals), and
2. through ``recipes.harmodt.evaluate.run_grid`` (what every maskmtl evaluation runs), on our own
   envs (``recipes.metaworld.generate.make_env``) given the goals Meta-World drew in (1).

The policy is Meta-World's scripted expert of each task plus Gaussian action noise drawn from a
generator keyed by (seed, task, episode, step), so both sides act alike wherever they see the same
observation. It reads the float32 observation (our evaluator stores states as float32), and its
action is float32, as the evaluator's is. States are not normalised (mean 0, std 1).

What differs between the two protocols (the README's "Agreement with Meta-World's evaluation"):

- Goals. Meta-World builds 50 goal vectors per task once, under ``np.random.seed(seed)``, and each
  reset picks one of them at random (with replacement: 50 episodes see about 32 distinct goals).
  maskmtl draws a fresh goal for every (task, episode) from ``episode_seed(eval.seed, task,
  episode)``, from the same uniform distribution over the task's reset space. So the check hands
  Meta-World's goals to our envs (``FrozenGoalEnv``); with their own goals the two would play
  different episodes of the same distribution.
- Stopping. Meta-World's evaluation always ends an episode at its first success; maskmtl does when
  ``eval.stop_on_success=true`` (the default). Success ("ever succeeded") is the same either way;
  returns agree only with stopping on.
- Length. Meta-World's TimeLimit is the env's ``max_path_length`` (500); maskmtl's is
  ``eval.max_steps`` (500 by default).
- Return precision. Some tasks (push-v3, ...) return some rewards as ``np.float32``; gymnasium's
  RecordEpisodeStatistics adds them to a Python float, which NumPy 2 turns into a float32 sum, so
  Meta-World's episode returns carry float32 rounding (about 1e-7 relative). maskmtl sums in
  float64. Returns are therefore compared to a relative 1e-5; success is compared exactly.
- Seed 0. The custom vector env seeds task ``i`` with ``seed + i`` but treats ``seed=0`` as no seed
  at all, so its goals are then not reproducible; use a seed >= 1.

Run it: ``python -m recipes.metaworld.agreement --tasks reach-v3,push-v3 --episodes 5 --seed 1``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class NoisyExpert:
    """Meta-World's scripted expert with keyed Gaussian noise: one action from one observation."""

    tasks: tuple[str, ...]
    seed: int
    noise_std: float

    def __post_init__(self):
        from recipes.metaworld.generate import make_expert

        object.__setattr__(self, "experts", [make_expert(t) for t in self.tasks])

    def act(self, task: int, episode: int, step: int, obs: np.ndarray) -> np.ndarray:
        seen = np.asarray(obs, np.float32).astype(np.float64)
        noise = np.random.default_rng([self.seed, task, episode, step]).normal(0.0, 1.0, 4)
        action = self.experts[task].get_action(seen) + self.noise_std * noise
        return np.clip(action, -1.0, 1.0).astype(np.float32)


class MetaWorldAgent:
    """``metaworld.evaluation.Agent`` over a sync vector env with one env per task: it keeps each
    env's episode and step counters, and records every episode's goal vector at its reset."""

    def __init__(self, policy: NoisyExpert, envs):
        self.policy, self.envs = policy, envs
        n = envs.num_envs
        self.episode = np.full(n, -1)
        self.step = np.zeros(n, np.int64)
        self.goals: list[list[np.ndarray]] = [[] for _ in range(n)]

    def reset(self, env_mask: np.ndarray) -> None:
        for i in np.flatnonzero(env_mask):
            self.episode[i] += 1
            self.step[i] = 0
            # same-step autoreset: the env has already reset, so this is the new episode's goal
            self.goals[i].append(np.array(self.envs.envs[i].unwrapped._last_rand_vec, copy=True))

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        out = np.stack([self.policy.act(i, int(self.episode[i]), int(self.step[i]), observations[i])
                        for i in range(len(observations))])
        self.step += 1
        return out


class FrozenGoalEnv:
    """One of our evaluation envs (``make_env``) that plays a given goal vector: its reset uses
    ``rand_vec`` whatever it was seeded with (Meta-World's ``set_task`` freezes goals the same way)."""

    def __init__(self, task: str, rand_vec: np.ndarray):
        from recipes.metaworld.generate import make_env

        self.env = make_env(task, 0)
        self.env._last_rand_vec = np.array(rand_vec, copy=True)
        self.env._freeze_rand_vec = True

    @property
    def action_space(self):
        return self.env.action_space

    def seed(self, seed: int):
        return self.env.seed(seed)

    def reset(self):
        return self.env.reset()

    def step(self, action):
        return self.env.step(action)


class GridExpert:
    """``run_grid``'s policy: row i of the grid is task i, column j its episode j; the current step
    is the last of the window, and its index the last timestep."""

    def __init__(self, policy: NoisyExpert):
        self.policy = policy

    def __call__(self, states, actions, rtg, timesteps, mask) -> torch.Tensor:
        s = states[:, :, -1].numpy()            # (T, n, S), float32, not normalised
        step = timesteps[:, :, -1].numpy()      # (T, n)
        t_rows, n = s.shape[:2]
        out = np.stack([np.stack([self.policy.act(i, j, int(step[i, j]), s[i, j]) for j in range(n)])
                        for i in range(t_rows)])
        return torch.from_numpy(out)


@dataclass
class Agreement:
    """Both sides' results: per task, per episode (first ``episodes`` of each task)."""

    tasks: list[str]
    goals: list[list[np.ndarray]]
    metaworld_success: dict[str, float]       # metaworld.evaluation's success rate per task
    metaworld_returns: dict[str, list[float]]  # its episodic returns, in episode order
    ours_success: list[list[bool]]
    ours_returns: list[list[float]]
    ours_steps: list[list[int]]

    def mismatches(self, returns: bool = True, rtol: float = 1e-5) -> list[str]:
        """Every disagreement, in words (empty when the two agree). Returns are compared to ``rtol``:
        Meta-World's are float32 sums (see the module's notes), ours float64."""
        out = []
        for i, task in enumerate(self.tasks):
            rate = float(np.mean(self.ours_success[i]))
            if not np.isclose(rate, self.metaworld_success[task], rtol=0, atol=1e-12):
                out.append(f"{task}: success rate {rate} (ours) vs {self.metaworld_success[task]} (Meta-World)")
            if returns:
                for j, (a, b) in enumerate(zip(self.ours_returns[i], self.metaworld_returns[task])):
                    if not abs(a - b) <= rtol * max(1.0, abs(b)):
                        out.append(f"{task} episode {j}: return {a!r} (ours) vs {b!r} (Meta-World)")
        return out


def metaworld_evaluation(tasks: Sequence[str], episodes: int, seed: int, policy: NoisyExpert):
    """Meta-World's own evaluation of ``policy``: (success rate per task, returns per task, goals
    per task in episode order)."""
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the Meta-World/* ids)
    from metaworld.evaluation import evaluation

    if seed < 1:
        raise ValueError(f"seed={seed}: Meta-World's custom vector env ignores seed 0; use a seed >= 1")
    envs = gym.make_vec("Meta-World/custom-mt-envs", envs_list=list(tasks), seed=seed, vector_strategy="sync")
    try:
        agent = MetaWorldAgent(policy, envs)
        _, _, success, returns = evaluation(agent, envs, num_episodes=episodes)
    finally:
        envs.close()
    return success, returns, [g[:episodes] for g in agent.goals]


def check_agreement(tasks: Sequence[str], episodes: int = 3, seed: int = 1, noise_std: float = 0.5,
                    stop_on_success: bool = True, max_steps: int = 500, goals: str = "metaworld",
                    reference: tuple | None = None) -> Agreement:
    """Play the noisy expert through Meta-World's evaluation, then through ``run_grid``, on the
    goals Meta-World drew (``goals="metaworld"``) or on maskmtl's own per-episode goals
    (``goals="maskmtl"``, ``episode_seed(seed, task, episode)``, what every maskmtl evaluation
    plays: a different sample of the same distribution); returns both sides' per-episode results.
    ``reference``: ``metaworld_evaluation``'s result for the same tasks, episodes, seed and noise,
    to compare several settings of our side against one run of Meta-World's."""
    from recipes.harmodt.evaluate import run_grid
    from recipes.metaworld.generate import make_env

    if goals not in ("metaworld", "maskmtl"):
        raise ValueError(f"goals={goals!r}: expected 'metaworld' or 'maskmtl'")

    tasks = list(tasks)
    policy = NoisyExpert(tuple(tasks), int(seed), float(noise_std))
    mw_success, mw_returns, mw_goals = reference or metaworld_evaluation(tasks, episodes, seed, policy)
    if goals == "metaworld":
        envs = [[FrozenGoalEnv(task, mw_goals[i][j]) for j in range(episodes)] for i, task in enumerate(tasks)]
    else:
        envs = [[make_env(task, seed) for _ in range(episodes)] for task in tasks]
    obs_dim = 39
    report = run_grid(GridExpert(policy), envs, tasks, list(range(len(tasks))), list(range(episodes)), seed=seed,
                      state_mean=np.zeros((len(tasks), obs_dim)), state_std=np.ones((len(tasks), obs_dim)),
                      rtg_target=np.zeros(len(tasks)), reward_scale=1.0, context=1, max_steps=max_steps,
                      stop_on_success=stop_on_success)
    by_task = {t: [e for e in report.episodes if e.task == t] for t in tasks}
    return Agreement(tasks, mw_goals, {t: float(mw_success[t]) for t in tasks},
                     {t: [float(r) for r in mw_returns[t]] for t in tasks},
                     [[e.success for e in by_task[t]] for t in tasks],
                     [[e.ret for e in by_task[t]] for t in tasks],
                     [[e.steps for e in by_task[t]] for t in tasks])


def main(argv: Sequence[str] | None = None) -> int:
    from recipes.common import print_table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="reach-v3,push-v3,pick-place-v3,door-open-v3",
                   help="comma-separated Meta-World v3 task names")
    p.add_argument("--episodes", type=int, default=5, help="episodes per task")
    p.add_argument("--seed", type=int, default=1, help="Meta-World's benchmark seed (>= 1) and the noise seed")
    p.add_argument("--noise", type=float, default=0.5, help="std of the Gaussian action noise")
    p.add_argument("--no-stop-on-success", action="store_true",
                   help="keep playing after a success on our side (Meta-World's evaluation always stops)")
    p.add_argument("--own-goals", action="store_true",
                   help="our side plays its own per-episode goals instead of Meta-World's")
    a = p.parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    unknown = [t for t in tasks if t not in ALL_V3_ENVIRONMENTS]
    if unknown:
        p.error(f"--tasks: not Meta-World v3 tasks: {unknown}")
    res = check_agreement(tasks, a.episodes, a.seed, a.noise, stop_on_success=not a.no_stop_on_success,
                          goals="maskmtl" if a.own_goals else "metaworld")
    per_task = {t: {"success MW": res.metaworld_success[t], "success ours": float(np.mean(res.ours_success[i])),
                    "return MW": float(np.mean(res.metaworld_returns[t])),
                    "return ours": float(np.mean(res.ours_returns[i])),
                    "distinct goals": float(len({tuple(g) for g in res.goals[i]}))} for i, t in enumerate(tasks)}
    print_table("Meta-World's evaluation vs maskmtl's", per_task)
    bad = res.mismatches(returns=not a.no_stop_on_success)
    for line in bad:
        print("MISMATCH", line)
    print("agree: every episode's success and return" if not bad else f"{len(bad)} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
