"""Task-agnostic evaluation (journal Algorithm 3, inference stage): no task id, no task's own
prompt and no per-task statistic reaches the policy.

Every episode runs in two phases, all envs of the (tasks × envs) grid stepping together:

1. **Probe** (steps ``0 … probe_steps − 1``): the policy acts with the *shared* parameters
   (``gate.probe_params``: ``dense`` = θ itself, as Algorithm 3 writes it; ``voting`` = θ ⊙ the
   voting mask of spec §6), a *blind* prompt or task id (``gate.blind``: ``random`` = the prompt /
   id of a task drawn uniformly per episode, which carries no information about the episode's
   task; ``empty`` = an all-padding prompt, only for prompt models), and the return target pooled
   over all tasks (``eval.rtg_quantile`` of every task's data returns together).
2. **Routed**: after the probe's last step the gate reads the last ``gn`` transitions
   (s, a, r) of the probe and predicts a label: a group (G-HarmoDT) or a task ("+gating"). The env
   then acts with that label's group mask, the prompt / task id of a member of the label drawn
   uniformly per episode (for a task label: that task), and the label's return target (the same
   quantile over its member tasks' returns); the return-to-go history in the context is relabelled
   to the new target so it stays target − rewards so far.

Without a gate (``gate.target=none``) phase 1 lasts the whole episode. States are normalised with
pooled statistics (``data.sampling.state_norm=all``, checked by the recipe).

The policy (``RoutedPolicy``) runs one forward per distinct parameter row in use at that step
(at most 1 + number of groups), each over all envs routed to it; the routing, prompt row and task
id of every env are arrays that the hook (``AgnosticRouter``) rewrites mid-episode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call

from recipes.harmodt.evaluate import POLICY_IMPLS, EvalReport, GridHistory, CallMethod, run_grid

PROBE_PARAMS = ("dense", "voting")
BLIND = ("random", "empty")


class RoutedPolicy:
    """One call for a (T, n) grid in which env (i, j) acts with parameter row ``route[i, j]``,
    prompt row ``prompt_route[i, j]`` and task id ``task_route[i, j]``; all three (int arrays of
    shape (T, n)) may be rewritten between steps.

    Args:
        model: a ``PromptDT``.
        param_masks: one entry per parameter row: ``None`` (dense θ) or target name -> bool mask.
        prompts: tuple (states, actions, rtg, timesteps, mask), leading dim = prompt rows, or ``None``.
        task_ids: pass ``task_route`` to the model (MTDT-style models).
        grid: (T, n).
        impl: ``eval.policy_impl`` (see ``GridPolicy``). This policy loops over parameter rows
            already, so ``cached`` and ``cached_loop`` are the same here: each (parameter row,
            prompt row) pair's prompt is encoded the first time an env uses it, and only the last
            state's output is computed, with torch's fused attention.
    """

    def __init__(self, model: torch.nn.Module, param_masks: Sequence[Mapping[str, torch.Tensor] | None],
                 prompts: tuple | None, task_ids: bool, grid: tuple[int, int], impl: str = "reference"):
        if impl not in POLICY_IMPLS:
            raise ValueError(f"eval.policy_impl={impl!r}: expected one of {', '.join(POLICY_IMPLS)}")
        if not hasattr(model, "encode_prompt"):
            impl = "reference"  # only the Prompt-DT has the cached forward
        self.model, self.prompts, self.task_ids, self.impl = model, prompts, task_ids, impl
        self._prefix: dict[tuple[int, int], tuple] = {}  # (parameter key, prompt row) -> encoded prompt
        self._batched: dict[int, tuple] = {}  # parameter key -> (its envs' prompt rows, their prefix batch)
        self.device = next(model.parameters()).device
        params = dict(model.named_parameters())
        with torch.no_grad():  # θ ⊙ M per row, made once per evaluation
            self.weights = [None if m is None else {n: torch.where(m[n], params[n], 0.0) for n in m}
                            for m in param_masks]
        # rows without masks share one forward: key -1
        self._key = np.array([-1 if w is None else r for r, w in enumerate(self.weights)])
        self.route = np.zeros(grid, np.int64)
        self.prompt_route = np.zeros(grid, np.int64)
        self.task_route = np.zeros(grid, np.int64)

    @torch.inference_mode()
    def __call__(self, states, actions, rtg, timesteps, mask) -> torch.Tensor:
        """Inputs (T, n, K, ·); returns the action for the last step, (T, n, A)."""
        t, n = states.shape[:2]
        flat = lambda x: x.reshape(t * n, *x.shape[2:]).to(self.device)  # noqa: E731
        args = [flat(x) for x in (states, actions, rtg, timesteps, mask)]
        keys = self._key[self.route.reshape(-1)]
        prompt_rows = torch.from_numpy(self.prompt_route.reshape(-1)).to(self.device)
        task_rows = torch.from_numpy(self.task_route.reshape(-1)).to(self.device)
        out = None
        for key in np.unique(keys):
            idx = torch.from_numpy(np.flatnonzero(keys == key)).to(self.device)
            kwargs = {}
            if self.impl != "reference":
                kwargs.update(last=True, fused_attention=True)
                if self.prompts is not None:
                    kwargs["prefix"] = self._batch_prefix(int(key), tuple(prompt_rows[idx].tolist()))
            elif self.prompts is not None:
                kwargs["prompt"] = tuple(p[prompt_rows[idx]] for p in self.prompts)
            if self.task_ids:
                kwargs["task"] = task_rows[idx]
            sub = [a[idx] for a in args]
            y = self.model(*sub, **kwargs) if key < 0 else functional_call(self.model, self.weights[key], tuple(sub), kwargs)
            if out is None:
                out = torch.empty((t * n, y.shape[-1]), dtype=y.dtype, device=y.device)
            out[idx] = y[:, -1]
        return out.reshape(t, n, -1)

    def _batch_prefix(self, key: int, rows: tuple[int, ...]) -> tuple:
        """The encoded prompts of the envs on parameter row ``key``, whose prompt rows are ``rows``,
        as one batch; rebuilt only when that routing changes (between the probe and the label)."""
        hit = self._batched.get(key)
        if hit is None or hit[0] != rows:
            encoded = [self._encoded(key, r) for r in rows]
            hit = (rows, tuple(torch.cat([e[i] for e in encoded], 1 if i < 2 else 0) for i in range(3)))
            self._batched[key] = hit
        return hit[1]

    def _encoded(self, key: int, row: int) -> tuple:
        """Prompt row ``row`` encoded under parameter row ``key`` (-1: dense), batch 1, made once."""
        if (key, row) not in self._prefix:
            prompt = tuple(p[row:row + 1] for p in self.prompts)
            if key < 0:
                self._prefix[key, row] = self.model.encode_prompt(prompt)
            else:
                enc = CallMethod(self.model, "encode_prompt")
                self._prefix[key, row] = functional_call(enc, {f"model.{n}": v for n, v in self.weights[key].items()},
                                                         (prompt,))
        return self._prefix[key, row]


@dataclass
class Routing:
    """What a gate label means at evaluation: the label's group mask, the tasks whose prompt / id
    may stand for it, and its return target (raw reward units)."""

    group: list[int]  # label -> group row of the masks
    members: list[list[int]]  # label -> task indices
    rtg: np.ndarray  # (labels,)
    pooled_rtg: float  # the probe's target


class AgnosticRouter:
    """``run_grid`` hook: at the end of the probe, ask the gate and route every env that played the
    whole probe to its label's parameters, prompt / task id and return target.

    Parameter rows of ``policy``: 0 = the probe's shared parameters, 1 + g = group g's mask.
    Records per env the predicted label (-1 when the env finished before the probe ended, or
    when there is no gate).
    """

    def __init__(self, policy: RoutedPolicy, gate, routing: Routing, *, probe_steps: int, gn: int,
                 n_tasks: int, blind: str, seed: int, task_index: Sequence[int], episode_ids: Sequence[int]):
        self.policy, self.gate, self.routing = policy, gate, routing
        self.probe_steps, self.gn = int(probe_steps), int(gn)
        self.seed, self.task_index, self.episode_ids = int(seed), list(task_index), list(episode_ids)
        grid = policy.route.shape
        self.predicted = np.full(grid, -1, np.int64)
        policy.route[:] = 0
        for i in range(grid[0]):
            for j in range(grid[1]):
                pick = int(self._rng(i, j, 5).integers(n_tasks))
                policy.prompt_route[i, j] = n_tasks if blind == "empty" else pick  # row n_tasks: the empty prompt
                policy.task_route[i, j] = pick

    def _rng(self, i: int, j: int, stream: int) -> np.random.Generator:
        # a fixed draw per (task row, episode): independent of the policy, the same in every run
        return np.random.default_rng([self.seed, int(self.task_index[i]), int(self.episode_ids[j]), stream])

    def __call__(self, t: int, h: GridHistory) -> None:
        if self.gate is None or t != self.probe_steps - 1:
            return
        ready = np.argwhere(h.steps >= self.probe_steps)  # (k, 2) envs that played the whole probe
        if len(ready) == 0:
            return
        w = slice(self.probe_steps - self.gn, self.probe_steps)
        ii, jj = ready[:, 0], ready[:, 1]
        raw_states = h.states[ii, jj, w] * h.state_std[ii] + h.state_mean[ii]  # (k, gn, S) back to raw
        labels = self.gate.predict(self.gate.data.stats.features(raw_states, h.actions[ii, jj, w], h.rewards[ii, jj, w]))
        for (i, j), label in zip(ready, labels):
            label = int(label)
            self.predicted[i, j] = label
            members = self.routing.members[label]
            member = members[int(self._rng(i, j, 6).integers(len(members)))]
            self.policy.route[i, j] = 1 + self.routing.group[label]
            self.policy.prompt_route[i, j] = member
            self.policy.task_route[i, j] = member
            delta = (self.routing.rtg[label] - self.routing.pooled_rtg) / h.reward_scale
            h.rtg[i, j, :t + 2, 0] += delta  # the context's return-to-go now counts down from the new target


def evaluate_agnostic(model, *, masks, gate, routing: Routing, probe_params: str, voting_thresh: float,
                      prompts: tuple | None, task_ids: bool, blind: str, probe_steps: int, gn: int, envs: list[list],
                      tasks: Sequence[str], state_mean: np.ndarray, state_std: np.ndarray, reward_scale: float,
                      context: int, ev) -> tuple[EvalReport, list[dict]]:
    """``ev.episodes`` task-agnostic episodes of every task, ``ev.parallel`` at a time per task
    (``ev``: the ``EvalSpec``).

    Args:
        masks: the ``MaskSet`` (groups); all-ones masks make every row the dense model.
        gate: a ``Gate`` or ``None`` (no routing: the probe's parameters act throughout).
        prompts: per-task prompts (leading dim = number of tasks) or ``None``; an empty prompt row is
            appended for ``blind=empty``.
    Returns: the summarised report and, per episode, the gate's label (``-1``: none).
    """
    n_tasks = len(tasks)
    dense = bool((masks.density() == 1.0).all())
    groups = [None if dense else masks.group(g) for g in range(masks.n_groups)]
    probe = None
    if not dense and probe_params == "voting":
        probe = masks.voting_mask(voting_thresh)
    if prompts is not None:
        empty = tuple(torch.zeros_like(p[:1]) for p in prompts)  # zeros, mask False: nothing to attend
        prompts = tuple(torch.cat([p, e]) for p, e in zip(prompts, empty))
    rows = list(range(n_tasks))
    was_training = model.training
    model.eval()
    report, predictions = EvalReport([]), []
    n = ev.parallel
    for first in range(0, ev.episodes, n):
        episodes = list(range(first, min(first + n, ev.episodes)))
        policy = RoutedPolicy(model, [probe, *groups], prompts, task_ids, (n_tasks, len(episodes)),
                              impl=getattr(ev, "policy_impl", "reference"))
        router = AgnosticRouter(policy, gate, routing, probe_steps=probe_steps, gn=gn, n_tasks=n_tasks, blind=blind,
                                seed=ev.seed, task_index=rows, episode_ids=episodes)
        part = run_grid(policy, [row[:len(episodes)] for row in envs], tasks, rows, episodes, seed=ev.seed,
                        state_mean=state_mean, state_std=state_std,
                        rtg_target=np.full(n_tasks, routing.pooled_rtg), reward_scale=reward_scale, context=context,
                        max_steps=ev.max_steps, stop_on_success=ev.stop_on_success, on_step=router)
        for i in range(n_tasks):
            for j, e in enumerate(episodes):
                predictions.append({"task": tasks[i], "episode": e, "label": int(router.predicted[i, j])})
        report.episodes += part.episodes
        report.policy_s += part.policy_s
        report.sim_s += part.sim_s
        report.env_steps += part.env_steps
    model.train(was_training)
    return report.summarise(), predictions
