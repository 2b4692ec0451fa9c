"""Specification tests for the mutations that survived the suite (issue 24, item 5).

Each test states the behaviour a user relies on, from a closed form or a hand computation, and fails under
the mutation named in its docstring (listed in tools/mutation_check.py).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

import vgf_prob as vgf
from vgf_prob.distributions import FlowMatchingPolicy, ParticlePolicy
from vgf_prob.flows import median_bandwidth, pairwise_sq_distances
from vgf_prob.llm import NearestTokenDecoder, RewardModel
from vgf_prob.llm.embedding_space import tokenize_responses
from vgf_prob.rl.minari_data import flatten_observations


# ------------------------------------------------------------------------------------------ values.py
def test_as_value_probe_compares_two_states_with_different_observations():
    """States 0 and 1 share obs; only state 2 differs. A matched-rows critic, (obs * actions).sum(-1), agrees
    with the particle layout on two equal states, so a probe on states 0 and 1 would pick 'particles' and then
    pair obs row j with particle j. (Mutation: as-value-probe-first-two-states.)"""
    obs = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    actions = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(0))
    value = vgf.as_value(lambda o, a: (o * a).sum(-1))
    q = value(obs, actions)
    assert value.layout == "rows"
    assert torch.allclose(q, (obs[:, None, :] * actions).sum(-1))


@pytest.mark.parametrize("critic_dtype, actions_dtype",
                         [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_as_value_returns_the_actions_dtype(critic_dtype, actions_dtype):
    """Inputs are cast to the critic's dtype and the result back to the actions'. (Mutation:
    as-value-result-not-cast-back.)"""
    critic = nn.Linear(3 + 2, 1).to(critic_dtype)
    obs = torch.randn(4, 3, dtype=actions_dtype)
    actions = torch.randn(4, 5, 2, dtype=actions_dtype)
    q = vgf.as_value(critic, layout="concat")(obs, actions)
    assert q.dtype == actions_dtype and q.shape == (4, 5)
    rows = torch.cat([obs[:, None].expand(4, 5, 3), actions], -1).to(critic_dtype)
    assert torch.allclose(q, critic(rows).squeeze(-1).to(actions_dtype), atol=1e-6)


# ------------------------------------------------------------------------------------------ transport.py
@pytest.mark.parametrize("operator", ["max_steps", "all_of"])
def test_host_known_step_count_is_the_smallest_limit(operator):
    """StepBudget(3) capped by max_steps=5, or StepBudget(3) & StepBudget(5): every state takes 3 steps of a
    constant gradient (0.1 each). (Mutation: transport-uniform-steps-max.)"""
    budget, cap = (vgf.StepBudget(3), 5) if operator == "max_steps" else (vgf.StepBudget(3) & vgf.StepBudget(5), None)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.Euler(0.1), budget=budget, max_steps=cap)
    out = flow(torch.zeros(2, 1, 1, dtype=torch.float64), None, lambda obs, a: a.sum(-1))
    assert torch.allclose(out.particles, torch.full((2, 1, 1), 0.3, dtype=torch.float64))
    assert out.report.steps.tolist() == [3, 3]


# ------------------------------------------------------------------------------------------ flows/solvers.py
@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_ode_box_wall_does_not_spend_the_displacement_budget(method):
    """x0 = (0.9, 0), Q = a1 + a2, box [-1, 1], DisplacementBudget(0.5): a1 reaches the wall at t = 0.1 and
    stays; a2 goes on until sqrt(0.1^2 + a2^2) = 0.5, a2 = sqrt(0.24) = 0.490. Were the outward velocity kept,
    the particle would spend budget outside the box: a2 = 0.5 / sqrt(2) = 0.354. (Mutation:
    ode-outward-velocity-kept.)"""
    x0 = torch.tensor([[[0.9, 0.0]]], dtype=torch.float64)
    budget = vgf.DisplacementBudget(0.5) & vgf.StepBudget(100)
    flow = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ODESolver(method, step_size=0.01), budget=budget,
                                 projection=vgf.BoxProjection())
    out = flow(x0, None, lambda obs, a: a.sum(-1))
    assert out.particles[0, 0, 0].item() == pytest.approx(1.0, abs=1e-3)
    assert out.particles[0, 0, 1].item() == pytest.approx(math.sqrt(0.24), abs=0.01)


# ------------------------------------------------------------------------------------------ flows/fields.py, kernels.py
def two_points() -> Tensor:
    """One state, particles at 0 and 1 (A = 1): d2 = [[0, 1], [1, 0]], median of {0, 0, 1, 1} = 1/2."""
    return torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)


def test_median_bandwidth_by_hand():
    """s^2 = median(d2) / (2 log(N + 1)) = 0.5 / (2 log 3). (Mutation: kernel-bandwidth-log-n.)"""
    d2 = pairwise_sq_distances(two_points())
    assert median_bandwidth(d2).item() == pytest.approx(0.5 / (2 * math.log(3)), rel=1e-12)


def test_kernel_smoothed_gradient_by_hand():
    """phi_i = (1/N) sum_j K_ij grad Q(x_j) with grad Q = 3 everywhere, K_12 = exp(-1 / (2 s^2 + 1e-6)) and
    2 s^2 = 0.5 / log 3: phi = (1 + K_12) * 3 / 2 for both particles. (Mutation: smoothed-gradient-not-averaged.)"""
    k12 = math.exp(-1.0 / (0.5 / math.log(3) + 1e-6))
    phi = vgf.KernelSmoothedGradient()(None, two_points(), lambda obs, a: 3.0 * a.sum(-1))
    assert torch.allclose(phi, torch.full((1, 2, 1), (1 + k12) * 1.5, dtype=torch.float64), rtol=1e-12)


def test_cross_distances_match_cdist():
    """pairwise_sq_distances(x, y) = ||x_i - y_j||^2 (torch.cdist squared). (Mutation: kernel-cross-distance-factor.)"""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    assert torch.allclose(pairwise_sq_distances(x, y), torch.cdist(x, y).square(), atol=1e-12)


# ------------------------------------------------------------------------------------------ distributions
def test_tanh_bound_flow_target_on_a_box_other_than_unit():
    """Box [0, 4] (center 2, half-width 2): the action 3 is fitted at z = atanh((3 - 2) / 2) = atanh(1/2), and
    c + h tanh(z) gives the action back. (Mutation: tanh-target-times-half-width.)"""
    policy = FlowMatchingPolicy(1, 2, hidden_dims=(8,), action_low=0.0, action_high=4.0, bound="tanh")
    actions = torch.tensor([[3.0, 1.0]])
    z = policy.flow_target(actions)
    assert torch.allclose(z, torch.tensor([[math.atanh(0.5), math.atanh(-0.5)]]))
    assert torch.allclose(2.0 + 2.0 * torch.tanh(z), actions)


def test_softmax_selection_divides_by_the_temperature():
    """Scores (0, log 3) at temperature 1/2: p(second) = 9 / (1 + 9) = 0.9 (it would be sqrt(3) / (1 + sqrt(3))
    = 0.63 with Q * temperature). 20 000 states, one draw each. (Mutation: softmax-times-temperature.)"""
    particles = torch.tensor([[0.0], [1.0]]).expand(20_000, 2, 1)
    scores = torch.tensor([0.0, math.log(3.0)]).expand(20_000, 2)
    chosen = ParticlePolicy(particles).select("softmax", scores=scores, temperature=0.5,
                                              generator=torch.Generator().manual_seed(0))
    assert chosen.mean().item() == pytest.approx(0.9, abs=0.01)  # 5 standard errors is 0.0106


# ------------------------------------------------------------------------------------------ rl/minari_data.py
def test_minari_dict_observations_concatenate_in_sorted_key_order():
    """{'observation', 'desired_goal', 'achieved_goal'} flattens as achieved_goal, desired_goal, observation
    whatever the dict's insertion order, nested dicts too. (Mutation: minari-keys-unsorted.)"""
    obs = {"observation": np.array([[1.0], [1.0]]), "desired_goal": np.array([[2.0], [2.0]]),
           "achieved_goal": {"z": np.array([[4.0], [4.0]]), "a": np.array([[3.0], [3.0]])}}
    assert flatten_observations(obs).tolist() == [[3.0, 4.0, 2.0, 1.0]] * 2


# ------------------------------------------------------------------------------------------ llm
WORDS = ["[PAD]", "[UNK]", "the", "day", "was", "fine", "late", "!", ":"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_a_token_starting_at_the_responses_end_is_not_response(tokenizer):
    """Template '{prompt}: {response}!': the '!' begins exactly where the response ends and is not part of it.
    (Mutation: llm-token-at-response-end.)"""
    batch = tokenize_responses(tokenizer, ["the day"], [["was late", "fine"]], template="{prompt}: {response}!")
    ids = batch.input_ids[0, 0][batch.is_response[0, 0]].tolist()
    assert ids == [WORDS.index("was"), WORDS.index("late")]
    assert batch.response_mask[0].sum(-1).tolist() == [2, 1]


class EmbeddingOnly(nn.Module):
    """A reward model that reads embeddings: r = sum of the first coordinate over unmasked positions."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 3)
        nn.init.uniform_(self.embedding.weight, 1.0, 2.0)  # every row non-zero, [PAD]'s included

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return (inputs_embeds[..., 0] * attention_mask).sum(-1)


def test_response_particles_are_zero_in_padding_slots(tokenizer):
    """x0 [B, N, T * D]: a response's token embeddings, then zeros in its padding slots (not E[pad]).
    (Mutation: llm-padding-slots-not-zeroed.)"""
    model = RewardModel(EmbeddingOnly(len(WORDS)), tokenizer, padding_side="right")
    batch = model.tokenize(["the day"], [["was late", "fine"]])
    x0 = model.particles(batch).view(1, 2, 2, 3)
    table = model.embedding_matrix
    assert torch.equal(x0[0, 1, 1], torch.zeros(3))
    assert torch.equal(x0[0, 1, 0], table[WORDS.index("fine")])
    assert torch.equal(x0[0, 0], table[[WORDS.index("was"), WORDS.index("late")]])


def test_nearest_token_decoder_keeps_the_original_on_a_tie():
    """E = [(0, 0), (2, 0)]; a slot that started at token 1 and moved to (1, 0), equally far from both, keeps
    token 1 (ties keep t_k). (Mutation: llm-decode-tie-replaces.)"""
    decoder = NearestTokenDecoder(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    assert decoder(torch.tensor([[1.0, 0.0]]), torch.tensor([1])).tolist() == [1]
    assert decoder(torch.tensor([[0.9, 0.0]]), torch.tensor([1])).tolist() == [0]
