"""A policy-gradient problem small enough to solve exactly: a tabular autoregressive softmax policy.

The model. P prompts; a vocabulary of V tokens: C = V − 1 content tokens 0..C−1 and the end-of-sequence
token EOS = C; a horizon H. A response is a_0 a_1 … a_{T−1}: it ends with the first EOS (which counts
as a token of the response, as in a language model) or is cut at H tokens, so 1 ≤ T ≤ H. The policy
is one table of logits θ [P, H, V, V]:

    π_θ(a_t = v | x, a_<t) = softmax_v θ[x, t, prev_t, v],   prev_t = a_{t−1} (t > 0), BOS = C (t = 0),

i.e. a logit per (prompt, position, previous token, next token); EOS never precedes a token, so its
index C serves as BOS. The parameters of different prompts are disjoint, so ∇J splits into one block
per prompt.

The reward is binary, r(x, y) = 1 when the response's content contains the answer token 0 ("solved"),
else 0. The objective is J(θ) = E_{x ~ U(prompts)} E_{y ~ π_θ(·|x)}[r(x, y)] = mean_x p(x), with β = 0
(the seed's binary-reward analysis). Every response can be enumerated (C^{T−1} responses end in EOS at
length T, C^H are cut at H: 2^{H+1} − 1 in all for C = 2), so J, ∇J (float64 autograd over the
enumerated set), the pass rates p(x), the mean lengths T(x), the distribution of (r, T) and the exact
critic V(s_t) are exact.

The default problem (`default_problem`) has six prompts whose pass rates span hard to easy (1/16 to
15/16; two prompts share p = 1/2 with short and long responses, so the length terms of grpo_original
and dapo show apart from the pass-rate term). Each prompt's θ is a seeded random table plus an EOS bias
(the typical length) and an answer bias solved by bisection so that p(x) is exactly the target.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

ANSWER = 0  # the content token whose presence solves the prompt

# (target pass rate, EOS logit bias): hard to easy, short and long; p = 1/2 twice (short and long).
DEFAULT_PROMPTS: tuple[tuple[float, float], ...] = (
    (1 / 16, 0.0),
    (0.25, -1.5),
    (0.5, 0.5),
    (0.5, -2.0),
    (0.75, -0.5),
    (15 / 16, -1.5),
)


@dataclass(frozen=True)
class Responses:
    """Responses of the toy policy, padded to H. tokens, prev, node [B, H] int64 (0 past the end);
    mask [B, H] bool; lengths [B] int64 (1..H); rewards [B] float64 (0/1); prompts [B] int64.

    prev_t is the index of the previous token (BOS = C at t = 0) and node_t the index of the prefix
    state s_t = (x, a_<t) among the `ToyProblem.num_nodes` prefixes of content tokens (see `node_index`).
    """

    prompts: Tensor
    tokens: Tensor
    prev: Tensor
    node: Tensor
    mask: Tensor
    lengths: Tensor
    rewards: Tensor


class ToyProblem:
    """The tabular policy with parameters `theta` [P, H, V, V] (float64) and its exact quantities.

    Exact quantities are computed on first use and cached (the problem is immutable: `theta` is cloned).
    """

    def __init__(self, theta: Tensor):
        if theta.dim() != 4 or theta.shape[2] != theta.shape[3] or theta.shape[3] < 2:
            raise ValueError(f"theta must be [P, H, V, V] with V >= 2, got {tuple(theta.shape)}")
        self.theta = theta.detach().to(torch.float64).clone()
        self.num_prompts, self.horizon, _, self.vocab = self.theta.shape
        self.eos = self.vocab - 1
        self.content = self.vocab - 1

    # --- the enumerated response set ------------------------------------------------------------

    @functools.cached_property
    def enumeration(self) -> Responses:
        """Every response (prompt-independent; `prompts` is 0): S = Σ_T C^{T−1} + C^H rows."""
        c, h = self.content, self.horizon
        rows = []
        for length in range(1, h + 1):
            for body in itertools.product(range(c), repeat=length - 1):
                rows.append(list(body) + [self.eos])
        rows.extend(list(body) for body in itertools.product(range(c), repeat=h))
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        tokens = torch.zeros(len(rows), h, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        return self._describe(torch.zeros(len(rows), dtype=torch.int64), tokens, lengths)

    def _describe(self, prompts: Tensor, tokens: Tensor, lengths: Tensor) -> Responses:
        """Masks, previous tokens, prefix nodes and rewards of responses given their tokens and lengths."""
        h = self.horizon
        positions = torch.arange(h)
        mask = positions < lengths.unsqueeze(1)
        tokens = torch.where(mask, tokens, 0)
        prev = torch.cat([torch.full_like(tokens[:, :1], self.eos), tokens[:, :-1]], dim=1)
        prev = torch.where(mask, prev, 0)
        node = self.node_index(tokens, mask)
        solved = ((tokens == ANSWER) & mask).any(dim=1)
        return Responses(prompts, tokens, prev, node, mask, lengths, solved.to(torch.float64))

    @functools.cached_property
    def num_nodes(self) -> int:
        """Prefix states s_t = (x, a_<t) with a_<t content tokens, t = 0..H−1: Σ_t C^t (per prompt)."""
        return sum(self.content**t for t in range(self.horizon))

    def node_index(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """[B, H] index of each position's prefix node: offset(t) + base-C code of a_<t (0 where masked).

        offset(t) = Σ_{u<t} C^u; the code of a_<t is Σ_{i<t} a_i C^{t−1−i}, built by a loop over H.
        """
        c = self.content
        node = torch.zeros_like(tokens)
        code = torch.zeros_like(tokens[:, 0])
        offset = 0
        for t in range(self.horizon):
            node[:, t] = offset + code
            offset += c**t
            code = code * c + tokens[:, t].clamp_max(c - 1)
        return torch.where(mask, node, 0)

    # --- log-probabilities ----------------------------------------------------------------------

    def token_logprobs(self, theta: Tensor, responses: Responses, table: Tensor | None = None) -> Tensor:
        """log π_θ(a_t | s_t) [B, H] (0 at masked positions), differentiable in `theta`.

        theta [P, H, V, V], or [R, P, H, V, V] with `table` [B] the replicate of each row (one parameter
        copy per replicate, so that one backward pass gives every replicate's gradient separately).
        """
        logp = torch.log_softmax(theta, dim=-1)
        t = torch.arange(self.horizon).expand_as(responses.tokens)
        x = responses.prompts.unsqueeze(1).expand_as(responses.tokens)
        index = (x, t, responses.prev, responses.tokens)
        if table is not None:
            index = (table.unsqueeze(1).expand_as(responses.tokens), *index)
        return torch.where(responses.mask, logp[index], 0.0)

    def sequence_probs(self, theta: Tensor | None = None) -> Tensor:
        """π_θ(y | x) [P, S] over the enumerated responses (differentiable in `theta`)."""
        theta = self.theta if theta is None else theta
        e = self.enumeration
        p, s = self.num_prompts, e.tokens.shape[0]
        every = Responses(torch.arange(p).repeat_interleave(s), e.tokens.repeat(p, 1), e.prev.repeat(p, 1),
                          e.node.repeat(p, 1), e.mask.repeat(p, 1), e.lengths.repeat(p), e.rewards.repeat(p))
        return self.token_logprobs(theta, every).sum(dim=1).exp().view(p, s)

    # --- exact quantities -----------------------------------------------------------------------

    def objective(self, theta: Tensor | None = None) -> Tensor:
        """J(θ) = mean_x Σ_y π_θ(y|x) r(x, y), a float64 scalar (differentiable in `theta`)."""
        return (self.sequence_probs(theta) * self.enumeration.rewards).sum(dim=1).mean()

    @functools.cached_property
    def gradient(self) -> Tensor:
        """∇J(θ) [P, H, V, V] by autograd over the enumerated set (float64)."""
        theta = self.theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.objective(theta), theta)
        return grad

    @functools.cached_property
    def probs(self) -> Tensor:
        """π(y | x) [P, S] at θ (no graph)."""
        return self.sequence_probs().detach()

    @functools.cached_property
    def pass_rate(self) -> Tensor:
        """p(x) = E[r] [P]."""
        return self.probs @ self.enumeration.rewards

    @functools.cached_property
    def mean_length(self) -> Tensor:
        """T(x) = E[T] [P] (EOS counted)."""
        return self.probs @ self.enumeration.lengths.to(torch.float64)

    @functools.cached_property
    def harmonic_length(self) -> Tensor:
        """1 / E[1/T] [P]: the harmonic mean length."""
        return 1 / (self.probs @ (1 / self.enumeration.lengths.to(torch.float64)))

    @functools.cached_property
    def outcome_pmf(self) -> Tensor:
        """P(r, T | x) [P, 2, H + 1] (index T = 0 is always 0)."""
        e = self.enumeration
        joint = torch.zeros(self.num_prompts, 2, self.horizon + 1, dtype=torch.float64)
        cell = e.rewards.to(torch.int64) * (self.horizon + 1) + e.lengths
        joint.view(self.num_prompts, -1).index_add_(1, cell, self.probs)
        return joint

    @functools.cached_property
    def values(self) -> Tensor:
        """The exact critic V(s) = E[r | s] [P, num_nodes] of every prefix state (0 for unreachable ones).

        V(s) = Σ_{y ⊒ s} π(y|x) r(y) / Σ_{y ⊒ s} π(y|x), summing over the enumerated responses y that
        extend the prefix s (node t of y is s for every valid position t of y).
        """
        e = self.enumeration
        n = self.num_nodes
        extends = torch.zeros(e.tokens.shape[0], n, dtype=torch.float64)
        rows = torch.arange(e.tokens.shape[0]).unsqueeze(1).expand_as(e.node)
        extends[rows[e.mask], e.node[e.mask]] = 1.0
        reach = self.probs @ extends  # π(s) [P, n]
        value = (self.probs * e.rewards) @ extends
        return torch.where(reach > 0, value / torch.where(reach > 0, reach, 1), 0.0)

    @functools.cached_property
    def greedy(self) -> Responses:
        """The greedy response ŷ(x) of every prompt (argmax at each step), [P] rows."""
        p, h = self.num_prompts, self.horizon
        tokens = torch.zeros(p, h, dtype=torch.int64)
        lengths = torch.full((p,), h, dtype=torch.int64)
        prev = torch.full((p,), self.eos, dtype=torch.int64)
        alive = torch.ones(p, dtype=torch.bool)
        for t in range(h):
            a = self.theta[torch.arange(p), t, prev].argmax(dim=-1)
            tokens[:, t] = torch.where(alive, a, 0)
            ended = alive & (a == self.eos)
            lengths = torch.where(ended, t + 1, lengths)
            alive = alive & ~ended
            prev = a
        return self._describe(torch.arange(p), tokens, lengths)

    @functools.cached_property
    def token_reward_moments(self) -> tuple[float, float]:
        """(μ, σ) of the reward over tokens, the seed's REINFORCE++ limits: with T̄ = E_x E_y[T],
        μ = E[r T]/T̄ and σ² = E[(r − μ)² T]/T̄ (every token of a response carries its reward)."""
        e = self.enumeration
        w = self.probs * e.lengths.to(torch.float64)  # [P, S]
        total = w.sum()
        mu = (w * e.rewards).sum() / total
        var = (w * (e.rewards - mu) ** 2).sum() / total
        return float(mu), float(var.sqrt())

    def summary(self) -> dict:
        """The problem's exact figures (JSON-ready)."""
        mu, sigma = self.token_reward_moments
        return {
            "prompts": self.num_prompts, "horizon": self.horizon, "vocab": self.vocab,
            "responses_per_prompt": int(self.enumeration.tokens.shape[0]), "parameters": int(self.theta.numel()),
            "objective": float(self.objective()), "gradient_norm": float(self.gradient.norm()),
            "pass_rate": self.pass_rate.tolist(), "mean_length": self.mean_length.tolist(),
            "harmonic_length": self.harmonic_length.tolist(), "token_reward_mean": mu, "token_reward_std": sigma,
            "greedy_reward": self.greedy.rewards.tolist(),
        }

    # --- sampling -------------------------------------------------------------------------------

    def sample(self, prompts: Tensor, generator: torch.Generator) -> Responses:
        """One response per entry of `prompts` [B] (int64), drawn from π_θ with `generator`.

        Batched over B; the loop runs over the H positions only. Draws by inverse CDF from one uniform
        per (row, position), so the result depends only on the generator's state and B.
        """
        b, h = prompts.shape[0], self.horizon
        probs = torch.softmax(self.theta, dim=-1)
        uniforms = torch.rand(b, h, generator=generator, dtype=torch.float64)
        tokens = torch.zeros(b, h, dtype=torch.int64)
        lengths = torch.full((b,), h, dtype=torch.int64)
        prev = torch.full((b,), self.eos, dtype=torch.int64)
        alive = torch.ones(b, dtype=torch.bool)
        for t in range(h):
            cdf = probs[prompts, t, prev].cumsum(dim=-1)
            a = (cdf < uniforms[:, t : t + 1]).sum(dim=-1).clamp_max(self.vocab - 1)
            tokens[:, t] = torch.where(alive, a, 0)
            ended = alive & (a == self.eos)
            lengths = torch.where(ended, t + 1, lengths)
            alive = alive & ~ended
            prev = a
        return self._describe(prompts, tokens, lengths)


def build_problem(
    prompts: tuple[tuple[float, float], ...] = DEFAULT_PROMPTS,
    *,
    horizon: int = 6,
    vocab: int = 3,
    seed: int = 0,
    scale: float = 0.5,
) -> ToyProblem:
    """A toy problem whose prompt x has pass rate exactly `prompts[x][0]` and EOS bias `prompts[x][1]`.

    θ = scale · N(0, 1) (torch.Generator seeded with `seed`) + the EOS bias on every EOS logit + an answer
    bias b_x on every logit of token 0, with b_x found by bisection (p(x) increases with b_x) to 1e-12.
    """
    if horizon < 2 or vocab < 3:
        raise ValueError("horizon must be >= 2 and vocab >= 3 (two content tokens and EOS)")
    if not prompts or any(not 0 < p < 1 for p, _ in prompts):
        raise ValueError("each prompt's target pass rate must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    base = scale * torch.randn(len(prompts), horizon, vocab, vocab, generator=g, dtype=torch.float64)
    eos_bias = torch.tensor([b for _, b in prompts], dtype=torch.float64)
    base[..., vocab - 1] += eos_bias.view(-1, 1, 1)
    target = torch.tensor([p for p, _ in prompts], dtype=torch.float64)

    def problem(answer_bias: Tensor) -> ToyProblem:
        theta = base.clone()
        theta[..., ANSWER] += answer_bias.view(-1, 1, 1)
        return ToyProblem(theta)

    low = torch.full_like(target, -30.0)
    high = torch.full_like(target, 30.0)
    for _ in range(100):  # all prompts at once: p(x) depends on prompt x's bias only
        mid = (low + high) / 2
        above = problem(mid).pass_rate > target
        high = torch.where(above, mid, high)
        low = torch.where(above, low, mid)
        if float((high - low).max()) < 1e-13:
            break
    return problem((low + high) / 2)


def default_problem() -> ToyProblem:
    """The problem of the report and the docs (six prompts, V = 3, H = 6, 324 parameters)."""
    return build_problem()
