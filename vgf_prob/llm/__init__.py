"""LLM RL with value gradient flow: refine a base model's responses in a reward model's token-embedding space.

    reward_model = RewardModel(model, tokenizer, template="{prompt}\\n{response}")
    flow = ValueGradientFlow(SteinField(alpha=1.0), Euler(4.0), budget=DisplacementBudget(8.0) & StepBudget(20))
    refinement = VGFRefiner(reward_model, flow, base=BaseLanguageModel(lm, lm_tokenizer))(prompts, responses)

``responses`` are N samples per prompt from the base model (``BaseLanguageModel.sample``); ``BestOfN`` and
``PlainSampling`` take the same arguments and return the same per-prompt reports, with ``refinement.cost``
(reward-model and base-model passes, counted where they run). ``preference_pairs(refinement)`` exports
(prompt, refined, sampled) rows in TRL's DPO format; ``vgf_prob.llm.judge`` has the gold scorer and judges of
the benchmark and recipe. ``vgf_prob.llm.demo`` runs
the whole pipeline offline on a CPU (``vgf-prob llm``).
"""

from vgf_prob.llm.cost import ComputeCost
from vgf_prob.llm.decode import NearestTokenDecoder, edit_distance, rewrite_response
from vgf_prob.llm.embedding_space import (
    DEFAULT_TEMPLATE,
    ResponseProjection,
    chat_template,
    TokenizedResponses,
    check_prompts,
    check_tokenizer,
    tokenize_responses,
)
from vgf_prob.llm.export import preference_pairs
from vgf_prob.llm.judge import FluencyGatedSentiment, ScoreJudge, vader_compound
from vgf_prob.llm.reference import BaseLanguageModel, load_smollm2, smollm2_gguf_path
from vgf_prob.llm.refine import (
    BestOfN,
    PlainSampling,
    PromptReport,
    Refinement,
    VGFRefiner,
)
from vgf_prob.llm.reward import (
    LastTokenScorer,
    ResponseValue,
    RewardModel,
    check_accepts_inputs_embeds,
    default_padding_side,
)
from vgf_prob.llm.reward_head import MeanPoolRewardModel, fit_reward_head

__all__ = [
    "DEFAULT_TEMPLATE",
    "BaseLanguageModel",
    "BestOfN",
    "ComputeCost",
    "FluencyGatedSentiment",
    "LastTokenScorer",
    "MeanPoolRewardModel",
    "NearestTokenDecoder",
    "PlainSampling",
    "PromptReport",
    "Refinement",
    "ResponseProjection",
    "ResponseValue",
    "RewardModel",
    "ScoreJudge",
    "TokenizedResponses",
    "VGFRefiner",
    "chat_template",
    "check_accepts_inputs_embeds",
    "check_prompts",
    "check_tokenizer",
    "default_padding_side",
    "edit_distance",
    "fit_reward_head",
    "load_smollm2",
    "preference_pairs",
    "rewrite_response",
    "smollm2_gguf_path",
    "tokenize_responses",
    "vader_compound",
]
