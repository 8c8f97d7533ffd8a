"""Prompt Decision Transformer (Prompt-DT) backbone, written for this project.

A GPT-2 style causal transformer over interleaved tokens. Each step t of a trajectory gives three
tokens in the order (return-to-go R_t, state s_t, action a_t), so a context of K steps is 3K
tokens; the trajectory prompt (K* steps of the same task, embedded by its own layers) is
prepended. The action a_t is predicted from the hidden state at the s_t token, which (causally)
sees R_≤t, s_≤t and a_<t and the whole prompt.

Defaults follow the papers' table (spec §8): 6 layers, 8 heads, ReLU MLPs, dropout 0.1, K = 20,
K* = 5. Note the spec's "embedding 256 ≈ 1.47 M parameters" does not add up: d = 128 gives
≈ 1.46 M (the papers' count), d = 256 gives ≈ 5.3 M (the published code's default); ``d_model``
is a config value.

Attention is written out (no fused kernel) so that ``torch.func.vmap`` can batch one forward over
per-task masked parameters on CPU, where scaled_dot_product_attention has no batching rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


ARCHS = ("dt", "mlp", "mgdt", "iql")


@dataclass(frozen=True)
class ModelSpec:
    """The ``model.*`` keys: the architecture, its sizes, and what conditions the policy (a prompt,
    a task id). ``arch``: ``dt`` (Prompt-DT / MTDT / HarmoDT), ``mlp`` (MTBC's task-id MLP actor,
    ``mlp_width`` × ``mlp_depth``), ``iql`` (MTIQL: that actor and multi-head critics of the same
    sizes) or ``mgdt`` (multi-game DT, ``return_bins`` classes of the
    return-to-go, ``return_loss_weight`` on their loss, ``expert_kappa`` at inference).
    ``max_ep_len``: rows of the timestep embedding (``None``: the data's and the evaluation's
    episode length)."""

    d_model: int
    n_layer: int
    n_head: int
    dropout: float
    prompt: bool
    task_id: bool
    arch: str = "dt"
    max_ep_len: int | None = None
    mlp_width: int = 256
    mlp_depth: int = 3
    return_bins: int = 60
    return_loss_weight: float = 1.0
    expert_kappa: float = 10.0

    @classmethod
    def from_config(cls, m) -> "ModelSpec":
        get = m.get
        return cls(d_model=int(m.d_model), n_layer=int(m.n_layer), n_head=int(m.n_head), dropout=float(m.dropout),
                   prompt=bool(m.prompt), task_id=bool(m.task_id), arch=str(get("arch", "dt")),
                   max_ep_len=None if get("max_ep_len") is None else int(get("max_ep_len")),
                   mlp_width=int(get("mlp_width", 256)), mlp_depth=int(get("mlp_depth", 3)),
                   return_bins=int(get("return_bins", 60)), return_loss_weight=float(get("return_loss_weight", 1.0)),
                   expert_kappa=float(get("expert_kappa", 10.0)))

    def build(self, obs_dim: int, act_dim: int, max_ep_len: int, n_tasks: int, return_max: float = 1.0) -> nn.Module:
        """The model of these sizes (a task embedding of ``n_tasks`` rows when ``task_id``);
        ``max_ep_len`` unless the spec sets its own; ``return_max``: MGDT's binned return range."""
        from recipes.harmodt import baselines

        max_ep_len = self.max_ep_len or max_ep_len
        if self.arch == "mlp":
            return baselines.MLPActor(obs_dim, act_dim, width=self.mlp_width, depth=self.mlp_depth,
                                      n_tasks=n_tasks if self.task_id else 0, dropout=self.dropout)
        if self.arch == "iql":
            return baselines.IQLAgent(obs_dim, act_dim, n_tasks, width=self.mlp_width, depth=self.mlp_depth,
                                      dropout=self.dropout)
        if self.arch == "mgdt":
            return baselines.MultiGameDT(obs_dim, act_dim, d_model=self.d_model, n_layer=self.n_layer,
                                         n_head=self.n_head, dropout=self.dropout, max_ep_len=max_ep_len,
                                         return_bins=self.return_bins, return_max=return_max)
        return PromptDT(obs_dim, act_dim, d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
                        dropout=self.dropout, use_prompt=self.prompt, max_ep_len=max_ep_len,
                        n_tasks=n_tasks if self.task_id else 0)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_head={n_head}")
        # n_head × head_dim is d_model when built; an exported model may have fewer heads here
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)  # output features [q | k | v], each n_head × head_dim
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past: tuple | None = None,
                queries: slice | None = None, fused: bool = False) -> torch.Tensor:
        # x: (B, L, d); allowed: (B, 1, Lq, Lk) bool, True where query i may attend to key j.
        # past: cached (keys, values) (B, nh, Lp, hs) of earlier tokens, put before this x's keys;
        # queries: which positions of x to compute outputs for (all by default);
        # fused: torch's scaled_dot_product_attention (eval only, and not under vmap, which has no
        # batching rule for it on CPU), with ``allowed`` as an additive mask of 0 / -inf.
        b, n, _ = x.shape
        q, k, v = self.project(x)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        if queries is not None:
            q = q[:, :, queries]
        if fused:
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, Lq, Lk)
            att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            y = self.attn_drop(att) @ v  # (B, nh, Lq, hs)
        y = y.transpose(1, 2).reshape(b, q.shape[2], self.n_head * self.head_dim)  # (B, Lq, nh·hs)
        return self.resid_drop(self.proj(y))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[q | k | v] -> 3 × (B, nh, L, hs); reshape (not split) so that nh = 0 (every head exported away) works."""
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past: tuple | None = None,
                queries: slice | None = None, fused: bool = False) -> torch.Tensor:
        a = self.attn(self.ln1(x), allowed, past, queries, fused)
        x = (x if queries is None else x[:, queries]) + a
        return x + self.mlp(self.ln2(x))


def attention_allowed(keep: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool from ``keep`` (B, L), False for padding: causal, padding keys never attended,
    and a padding query still sees itself (no all -inf rows)."""
    n = keep.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
    return (causal & keep[:, None, :]) | torch.eye(n, dtype=torch.bool, device=keep.device)


def run_blocks(blocks: nn.ModuleList, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The causal transformer over tokens ``h`` (B, L, d); ``keep`` (B, L) bool: False for padding."""
    allowed = attention_allowed(keep)
    for block in blocks:
        h = block(h, allowed[:, None])
    return h


class TokenEmbedding(nn.Module):
    """(R, s, a, t) of K steps -> 3K interleaved tokens (B, 3K, d), in the order R_1 s_1 a_1 R_2 ...
    (``state_first``: s_1 R_1 a_1 s_2 ..., the multi-game DT's order)."""

    def __init__(self, state_dim: int, act_dim: int, d_model: int, max_ep_len: int, state_first: bool = False):
        super().__init__()
        self.timestep = nn.Embedding(max_ep_len, d_model)
        self.ret = nn.Linear(1, d_model)
        self.state = nn.Linear(state_dim, d_model)
        self.action = nn.Linear(act_dim, d_model)
        self.state_first = state_first

    def forward(self, states, actions, rtg, timesteps) -> torch.Tensor:
        # states (B, K, S), actions (B, K, A), rtg (B, K, 1), timesteps (B, K) long
        time = self.timestep(timesteps)  # (B, K, d)
        r, s = self.ret(rtg) + time, self.state(states) + time
        tokens = torch.stack([s, r] if self.state_first else [r, s], dim=2)
        tokens = torch.cat([tokens, (self.action(actions) + time)[:, :, None]], dim=2)  # (B, K, 3, d)
        return tokens.reshape(states.shape[0], 3 * states.shape[1], -1)  # (B, 3K, d)


class PromptDT(nn.Module):
    """Prompt Decision Transformer.

    Args:
        state_dim, act_dim: observation and action sizes (Meta-World: 39, 4).
        d_model, n_layer, n_head, dropout: transformer size.
        max_ep_len: episode length bound for the timestep embedding (Meta-World: 500).
        use_prompt: prepend the trajectory prompt (Prompt-DT, HarmoDT).
        n_tasks: > 0 adds a task-id embedding to the state tokens (MTDT); 0 disables it.
    """

    def __init__(self, state_dim: int, act_dim: int, d_model: int = 128, n_layer: int = 6, n_head: int = 8,
                 dropout: float = 0.1, max_ep_len: int = 500, use_prompt: bool = True, n_tasks: int = 0):
        super().__init__()
        self.embed = TokenEmbedding(state_dim, act_dim, d_model, max_ep_len)
        self.prompt_embed = TokenEmbedding(state_dim, act_dim, d_model, max_ep_len) if use_prompt else None
        self.task_embed = nn.Embedding(n_tasks, d_model) if n_tasks > 0 else None
        self.embed_ln = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.predict_action = nn.Sequential(nn.Linear(d_model, act_dim), nn.Tanh())

    def attention_heads(self):
        """Each block's heads, for ``masking.granularity=head`` and export: the fused qkv
        projection splits into q, k, v blocks of n_head × head_dim; ``proj`` merges the heads."""
        from maskmtl.structures import AttentionHeads

        return [AttentionHeads(f"blocks.{i}.attn", b.attn.n_head, b.attn.head_dim,
                               split=((f"blocks.{i}.attn.qkv", 3),), merge=(f"blocks.{i}.attn.proj",))
                for i, b in enumerate(self.blocks)]

    def encode_prompt(self, prompt: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trajectory prompt as a cache for ``forward(prefix=...)``: every block's attention keys
        and values of the prompt tokens, (n_layer, B, nh, 3K*, hs) each, and which prompt tokens are
        real, (B, 3K*). The prompt is a causal prefix: no later token changes what it computes, so an
        evaluation encodes each task's prompt once instead of at every step."""
        if self.prompt_embed is None:
            raise ValueError("this model has no trajectory prompt (model.prompt=false): nothing to encode")
        p_states, p_actions, p_rtg, p_t, p_mask = prompt
        keep = p_mask.repeat_interleave(3, dim=1)  # (B, 3K*)
        allowed = attention_allowed(keep)
        h = self.drop(self.embed_ln(self.prompt_embed(p_states, p_actions, p_rtg, p_t)))
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            _, k, v = block.attn.project(block.ln1(h))
            keys.append(k)
            values.append(v)
            if i + 1 < len(self.blocks):  # the last block's prompt outputs are never read
                h = block(h, allowed[:, None])
        return torch.stack(keys), torch.stack(values), keep

    def forward(self, states, actions, rtg, timesteps, mask, prompt=None, task=None, prefix=None,
                last: bool = False, fused_attention: bool = False) -> torch.Tensor:
        """Predict actions.

        Shapes: ``states`` (B, K, S), ``actions`` (B, K, A), ``rtg`` (B, K, 1), ``timesteps``
        (B, K) long, ``mask`` (B, K) bool (False = padding, left-padded). ``prompt``: a tuple
        (states (B, K*, S), actions (B, K*, A), rtg (B, K*, 1), timesteps (B, K*), mask (B, K*)).
        ``task``: (B,) long, required when the model has a task embedding.
        ``prefix``: ``encode_prompt(prompt)``, in place of ``prompt`` (the same result).
        ``last``: predict the last step's action only (the evaluator's read-out), skipping the
        other positions in the last block.
        ``fused_attention``: torch's ``scaled_dot_product_attention`` in place of the written-out
        attention (evaluation outside vmap; equal up to float rounding; never with dropout).
        Returns: predicted actions (B, K, A), or (B, 1, A) with ``last``.
        """
        b, k = states.shape[:2]
        x = self.embed(states, actions, rtg, timesteps)  # (B, 3K, d)
        if self.task_embed is not None:
            if task is None:
                raise ValueError("this model has a task-id embedding (MTDT): pass task")
            x = x.reshape(b, k, 3, -1)
            x[:, :, 1] = x[:, :, 1] + self.task_embed(task)[:, None]  # task id on the state tokens
            x = x.reshape(b, 3 * k, -1)
        keep = mask.repeat_interleave(3, dim=1)  # (B, 3K)
        pasts = [None] * len(self.blocks)
        if self.prompt_embed is not None and prefix is None:
            if prompt is None:
                raise ValueError("this model uses a trajectory prompt: pass prompt")
            p_states, p_actions, p_rtg, p_t, p_mask = prompt
            x = torch.cat([self.prompt_embed(p_states, p_actions, p_rtg, p_t), x], dim=1)  # (B, 3K*+3K, d)
            keep = torch.cat([p_mask.repeat_interleave(3, dim=1), keep], dim=1)
        n = x.shape[1]
        allowed = attention_allowed(keep)  # (B, L, L)
        if self.prompt_embed is not None and prefix is not None:
            p_keys, p_values, p_keep = prefix  # the prompt's tokens come first: every query may see them
            allowed = torch.cat([p_keep[:, None, :].expand(b, n, p_keep.shape[1]), allowed], dim=2)
            pasts = [(kk, vv) for kk, vv in zip(p_keys.unbind(0), p_values.unbind(0))]
        if fused_attention:
            if self.training:
                raise ValueError("fused_attention is for evaluation (model.eval()): it applies no attention dropout")
            allowed = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        h = self.drop(self.embed_ln(x))
        for i, block in enumerate(self.blocks):
            if last and i + 1 == len(self.blocks):  # only the last state token's output is read
                h = block(h, allowed[:, None, n - 2:n - 1], pasts[i], slice(n - 2, n - 1), fused_attention)
            else:
                h = block(h, allowed[:, None], pasts[i], fused=fused_attention)
        if last:
            return self.predict_action(self.ln_f(h[:, -1:] if self.blocks else h[:, n - 2:n - 1]))  # (B, 1, A)
        h = self.ln_f(h)[:, -3 * k:].reshape(b, k, 3, -1)  # (B, K, 3, d): this trajectory's tokens
        return self.predict_action(h[:, :, 1])  # from the s_t tokens: (B, K, A)
