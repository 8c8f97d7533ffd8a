"""The journal's other offline baselines as models of the harmodt recipe, written for this project.

* ``MLPActor`` (MTBC, ``model.arch=mlp``): behaviour cloning with a task-id-conditioned MLP actor,
  a = tanh(MLP([s, onehot(task)])). It takes the recipe's segments like the transformers do and
  predicts every step's action from that step's state alone (context is ignored), so its loss,
  batches, masks and batched evaluation are the recipe's own.
* ``MultiGameDT`` (MGDT, ``model.arch=mgdt``; Lee et al. 2022, "Multi-Game Decision
  Transformers"): a decision transformer with no prompt and no task id whose tokens come in the
  order (s_t, R_t, a_t). The return-to-go R_t is predicted, as a class over ``return_bins`` equal
  bins of [0, ``return_max``], from the s_t token (which sees s_≤t, R_<t, a_<t but not R_t), the
  action from the R_t token. At inference R_t is not given: it is drawn from the predicted
  distribution tilted towards high returns, P(R | expert) ∝ P(R) exp(κ R / return_max)
  (``ReturnSamplingPolicy``), then the action is predicted with it.

Both keep the forward signature of ``PromptDT`` (states, actions, rtg, timesteps, mask, prompt,
task) -> (B, K, A), so ``MaskedModel``, ``GridPolicy`` and the held-out loss run them unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recipes.harmodt.evaluate import GridPolicy
from recipes.harmodt.model import Block, TokenEmbedding, run_blocks


class MLPActor(nn.Module):
    """Task-id-conditioned MLP actor (MTBC; MTIQL's actor).

    Args:
        state_dim, act_dim: observation and action sizes.
        width, depth: ``depth`` hidden layers of ``width`` ReLU units.
        n_tasks: > 0 concatenates the one-hot task id to the state; 0: no task id.
        dropout: after each hidden layer.
    """

    def __init__(self, state_dim: int, act_dim: int, width: int = 256, depth: int = 3, n_tasks: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.n_tasks = n_tasks
        layers, d_in = [], state_dim + n_tasks
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU(), nn.Dropout(dropout)]
            d_in = width
        self.trunk = nn.Sequential(*layers)
        self.predict_action = nn.Sequential(nn.Linear(d_in, act_dim), nn.Tanh())

    def forward(self, states, actions=None, rtg=None, timesteps=None, mask=None, prompt=None, task=None):
        """``states`` (B, K, S) -> actions (B, K, A), each step from its own state; ``task`` (B,) long
        is required when the actor is task-conditioned. The other inputs are accepted and unused."""
        if prompt is not None:
            raise ValueError("the MLP actor takes no trajectory prompt (model.prompt=false)")
        x = states
        if self.n_tasks:
            if task is None:
                raise ValueError("this actor is task-id conditioned (MTBC): pass task")
            onehot = F.one_hot(task, self.n_tasks).to(states.dtype)  # (B, T)
            x = torch.cat([states, onehot[:, None].expand(-1, states.shape[1], -1)], dim=-1)
        return self.predict_action(self.trunk(x))


# ---------------------------------------------------------------------------------- MGDT

def return_bin(rtg: torch.Tensor, n_bins: int, return_max: float | torch.Tensor) -> torch.Tensor:
    """The class of each return-to-go: equal bins of [0, return_max], values outside clamped into
    the first or last bin. ``rtg`` (...) -> long (...)."""
    return (rtg / return_max * n_bins).floor().clamp(0, n_bins - 1).long()


def bin_centres(n_bins: int, return_max: float | torch.Tensor) -> torch.Tensor:
    """The return each class stands for at inference: its bin's centre, (n_bins,)."""
    return (torch.arange(n_bins, dtype=torch.float32) + 0.5) * (return_max / n_bins)


def return_bin_loss(logits: torch.Tensor, rtg: torch.Tensor, mask: torch.Tensor, return_max) -> torch.Tensor:
    """Cross-entropy of the predicted return classes ``logits`` (B, K, n_bins) against the binned
    returns-to-go ``rtg`` (B, K, 1), over the real steps (``mask`` (B, K) True)."""
    target = return_bin(rtg[..., 0], logits.shape[-1], return_max)  # (B, K)
    return F.cross_entropy(logits[mask], target[mask])


def expert_return_logits(logits: torch.Tensor, kappa: float, n_bins: int) -> torch.Tensor:
    """log P(R | expert) up to a constant: log softmax(logits) + κ·(bin centre / return_max). The
    centre over return_max is (i + 0.5) / n_bins for bin i, so return_max cancels."""
    tilt = (torch.arange(n_bins, dtype=logits.dtype, device=logits.device) + 0.5) / n_bins
    return logits.log_softmax(-1) + kappa * tilt


class MultiGameDT(nn.Module):
    """Multi-game decision transformer (module docstring): tokens (s, R, a), no prompt, no task id.

    Args:
        state_dim, act_dim, d_model, n_layer, n_head, dropout, max_ep_len: as ``PromptDT``.
        return_bins: classes of the return-to-go.
        return_max: upper end of the binned range (returns-to-go in training units, divided by
            the data's reward scale); a buffer, saved with the weights.
    """

    def __init__(self, state_dim: int, act_dim: int, d_model: int = 128, n_layer: int = 6, n_head: int = 8,
                 dropout: float = 0.1, max_ep_len: int = 500, return_bins: int = 60, return_max: float = 1.0):
        super().__init__()
        if return_bins < 2 or not return_max > 0:
            raise ValueError(f"need return_bins >= 2 and return_max > 0, got {return_bins}, {return_max}")
        self.embed = TokenEmbedding(state_dim, act_dim, d_model, max_ep_len, state_first=True)
        self.embed_ln = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.predict_return = nn.Linear(d_model, return_bins)
        self.predict_action = nn.Sequential(nn.Linear(d_model, act_dim), nn.Tanh())
        self.return_bins = return_bins
        self.register_buffer("return_max", torch.tensor(float(return_max)))

    def attention_heads(self):
        """As ``PromptDT.attention_heads``: each block's heads, for ``masking.granularity=head``."""
        from maskmtl.structures import AttentionHeads

        return [AttentionHeads(f"blocks.{i}.attn", b.attn.n_head, b.attn.head_dim,
                               split=((f"blocks.{i}.attn.qkv", 3),), merge=(f"blocks.{i}.attn.proj",))
                for i, b in enumerate(self.blocks)]

    def forward(self, states, actions, rtg, timesteps, mask, prompt=None, task=None, output: str = "actions"):
        """Shapes as ``PromptDT.forward``. ``output``: ``actions`` (B, K, A), ``returns`` (the
        return-class logits, (B, K, return_bins)) or ``both`` (a tuple of the two)."""
        if prompt is not None or task is not None:
            raise ValueError("the multi-game DT takes neither a prompt nor a task id (model.prompt=false, "
                             "model.task_id=false)")
        b, k = states.shape[:2]
        x = self.embed(states, actions, rtg, timesteps)  # (B, 3K, d): s_1 R_1 a_1 s_2 ...
        h = self.ln_f(run_blocks(self.blocks, self.drop(self.embed_ln(x)), mask.repeat_interleave(3, dim=1)))
        h = h.reshape(b, k, 3, -1)
        if output == "returns":
            return self.predict_return(h[:, :, 0])
        act = self.predict_action(h[:, :, 1])
        return (act, self.predict_return(h[:, :, 0])) if output == "both" else act


class ReturnSamplingPolicy(GridPolicy):
    """MGDT's inference on the evaluation grid: at every step the current return-to-go is drawn
    from the expert-tilted predicted distribution (``expert_return_logits``, from a generator seeded
    by ``seed``, so an evaluation is reproducible), the action is predicted with it, and the drawn
    value is written into the played history (``on_step``) so later steps see the returns the
    policy conditioned on."""

    def __init__(self, model: MultiGameDT, tasks, masks=None, prompt=None, task_ids: bool = False, *,
                 kappa: float, seed: int):
        super().__init__(model, tasks, masks, prompt, task_ids)
        self.kappa, self.n_bins = float(kappa), int(model.return_bins)
        self.centres = bin_centres(self.n_bins, float(model.return_max))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.chosen: np.ndarray | None = None

    @torch.inference_mode()
    def __call__(self, states, actions, rtg, timesteps, mask) -> torch.Tensor:
        logits = self.forward(states, actions, rtg, timesteps, mask, output="returns")[:, :, -1]  # (T, n, bins)
        probs = expert_return_logits(logits.float().cpu(), self.kappa, self.n_bins).softmax(-1)
        pick = torch.multinomial(probs.reshape(-1, self.n_bins), 1, generator=self.generator).reshape(probs.shape[:2])
        chosen = self.centres[pick]  # (T, n)
        rtg = rtg.clone()
        rtg[:, :, -1, 0] = chosen
        self.chosen = chosen.numpy()
        return self.forward(states, actions, rtg, timesteps, mask, output="actions")[:, :, -1]

    def on_step(self, t: int, history) -> None:
        """After step t is played: the return-to-go it conditioned on is the history's."""
        history.rtg[:, :, t, 0] = self.chosen


# ---------------------------------------------------------------------------------- MTIQL
# Implicit Q-learning (Kostrikov et al. 2021, "Offline Reinforcement Learning with Implicit
# Q-Learning") as the HarmoDT papers' MTIQL: critics with one output head per task and the
# task-id-conditioned MLP actor. The formulas, written here (tested against hand-computed numbers):
#   V:     L_V = E[ L2_τ(min_i Q̄_i(s, a) − V(s)) ],  L2_τ(u) = |τ − 1(u < 0)| u²
#   Q:     L_Q = Σ_i E[ (Q_i(s, a) − (r + γ V(s')))² ]      (V(s') held fixed)
#   actor: L_π = E[ w ‖π(s) − a‖² ],  w = min(exp(β (min_i Q̄_i(s, a) − V(s))), w_max)   (held fixed)
# Q̄: the target critics, an exponential moving average of the critics (rate ``target_rate``)
# updated after every optimizer step. The actor is deterministic (tanh of the MLP), so the
# advantage-weighted log-likelihood of the paper becomes an advantage-weighted squared error.

def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """L2_τ(u) = |τ − 1(u < 0)| u², elementwise."""
    return (tau - (u < 0).to(u.dtype)).abs() * u.square()


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """exp(β A) clipped at ``max_weight``."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


def td_target(reward: torch.Tensor, next_value: torch.Tensor, gamma: float,
              done: torch.Tensor | None = None) -> torch.Tensor:
    """r + γ (1 − done) V(s')."""
    keep = 1.0 if done is None else 1.0 - done.to(reward.dtype)
    return reward + gamma * keep * next_value


class MultiHeadCritic(nn.Module):
    """An MLP over ``in_dim`` inputs with one output per task: (B, K, in) -> (B, K, n_tasks)."""

    def __init__(self, in_dim: int, n_tasks: int, width: int, depth: int):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(d, n_tasks)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """The head of each row's task: (B, K)."""
        out = self.heads(self.trunk(x))  # (B, K, T)
        return out.gather(-1, task[:, None, None].expand(-1, out.shape[1], 1))[..., 0]


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are buffers: saved with the weights, never trained."""
    import copy

    twin = copy.deepcopy(module)
    for sub in twin.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, p.detach().clone())
    return twin


class IQLAgent(nn.Module):
    """MTIQL: the task-id MLP actor (``actor``), twin multi-head Q critics (``q1``, ``q2``) and
    their target copies (``q1_target``, ``q2_target``, buffers), a multi-head value (``v``).

    ``forward(...)`` returns the actor's actions (B, K, A), like the other models, so evaluation and
    masks (the actor's weights) are the recipe's; ``output="iql"`` returns a dict of what the loss
    needs: ``actions``, ``q1``, ``q2``, ``q_target`` (min of the targets), ``v``, each (B, K) but
    ``actions``."""

    def __init__(self, state_dim: int, act_dim: int, n_tasks: int, width: int = 256, depth: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if n_tasks < 1:
            raise ValueError("MTIQL needs the task count (one critic head per task)")
        self.n_tasks = n_tasks
        self.actor = MLPActor(state_dim, act_dim, width=width, depth=depth, n_tasks=n_tasks, dropout=dropout)
        self.q1 = MultiHeadCritic(state_dim + act_dim, n_tasks, width, depth)
        self.q2 = MultiHeadCritic(state_dim + act_dim, n_tasks, width, depth)
        self.v = MultiHeadCritic(state_dim, n_tasks, width, depth)
        self.q1_target, self.q2_target = _frozen_copy(self.q1), _frozen_copy(self.q2)

    def forward(self, states, actions=None, rtg=None, timesteps=None, mask=None, prompt=None, task=None,
                output: str = "actions"):
        if task is None:
            raise ValueError("MTIQL is task-id conditioned: pass task")
        pred = self.actor(states, prompt=prompt, task=task)
        if output != "iql":
            return pred
        sa = torch.cat([states, actions], dim=-1)
        with torch.no_grad():
            q_target = torch.minimum(self.q1_target(sa, task), self.q2_target(sa, task))
        return {"actions": pred, "q1": self.q1(sa, task), "q2": self.q2(sa, task), "q_target": q_target,
                "v": self.v(states, task)}

    @torch.no_grad()
    def update_targets(self, rate: float) -> None:
        """Q̄ ← (1 − rate) Q̄ + rate Q."""
        for online, target in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
            buffers = dict(target.named_buffers())
            for name, p in online.named_parameters():
                buffers[name].lerp_(p, rate)


def iql_loss(out: dict, batch: dict, *, tau: float, beta: float, gamma: float, max_weight: float,
             reward_mult: torch.Tensor | None = None) -> torch.Tensor:
    """The MTIQL loss of one batch of segments (``IQLAgent.forward(..., output="iql")``'s ``out``):
    L_V + L_Q + L_π. Transitions are the consecutive real steps (t, t + 1) of each segment, with
    r_t = R_t − R_{t+1} (returns-to-go in training units) times ``reward_mult[task]`` when given, and
    no terminal (Meta-World episodes end by time limit only); every real step trains V and the actor."""
    mask, rtg = batch["mask"], batch["returns_to_go"][..., 0]
    if reward_mult is not None:
        rtg = rtg * reward_mult.to(rtg.device)[batch["task"]][:, None]
    v, q_target = out["v"], out["q_target"]
    adv = q_target - v
    loss_v = expectile_loss(adv[mask], tau).mean()
    pair = mask[:, :-1] & mask[:, 1:]  # (B, K-1)
    target = td_target(rtg[:, :-1] - rtg[:, 1:], v[:, 1:].detach(), gamma)
    # a batch whose segments all have one real step has no transition: no Q term then
    loss_q = sum((out[q][:, :-1] - target)[pair].square().sum() for q in ("q1", "q2")) / pair.sum().clamp(min=1)
    w = awr_weights(adv.detach(), beta, max_weight)
    err = (out["actions"] - batch["actions"]).square().mean(-1)
    loss_pi = (w * err)[mask].mean()
    return loss_v + loss_q + loss_pi
