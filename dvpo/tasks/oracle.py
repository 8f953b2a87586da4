"""A synthetic preference task with a hidden token-level oracle reward.

Prompts are a topic word plus a few context words; responses are short word sequences.
The oracle reward is a sum of per-token terms, ``r*(x, y) = sum_t s[topic, y_t] + b[y_{t-1}, y_t]``,
so credit assignment per token matters. The SFT corpus comes from a teacher that only
weakly prefers high-scoring words, so an SFT policy sits clearly below the oracle optimum.
Preference labels are Bradley-Terry draws on r*. Everything is a deterministic function of
the seed; the oracle is used only to label pairs and to evaluate.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

EOS, PAD, BOS = "<eos>", "<pad>", "<bos>"


@dataclass
class OracleTask:
    seed: int = 0
    n_topics: int = 8
    n_words: int = 32
    context_len: int = 3
    max_response_len: int = 8
    bigram_scale: float = 0.3
    teacher_temperature: float = 3.0  # the SFT teacher samples softmax(score / T): T >> 1 is weak
    bt_beta: float = 1.0  # Bradley-Terry sharpness of the preference labels
    _score: np.ndarray = field(init=False, repr=False)
    _bigram: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self._score = rng.normal(0.0, 1.0, (self.n_topics, self.n_words))
        self._bigram = rng.normal(0.0, self.bigram_scale, (self.n_words, self.n_words))
        self.topics = [f"t{i}" for i in range(self.n_topics)]
        self.words = [f"w{i}" for i in range(self.n_words)]
        self._word_id = {w: i for i, w in enumerate(self.words)}

    # --- text -----------------------------------------------------------------------------
    def vocabulary(self) -> list[str]:
        return [PAD, BOS, EOS, "="] + self.topics + self.words

    def tokenizer(self):
        """A word-level fast tokenizer over the task's vocabulary (pad, bos, eos set)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {tok: i for i, tok in enumerate(self.vocabulary())}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                       unk_token=PAD)

    def _topic(self, prompt: str) -> int:
        head = prompt.split()[0] if prompt.strip() else ""
        if head not in self.topics:
            raise ValueError(f"prompt must start with a topic word t0..t{self.n_topics - 1}, got {prompt!r}")
        return self.topics.index(head)

    def _ids(self, response: str) -> list[int]:
        out = []
        for w in response.split():
            if w == EOS:
                break
            if w in self._word_id:
                out.append(self._word_id[w])
        return out

    # --- oracle ---------------------------------------------------------------------------
    def reward_terms(self, prompt: str, response: str) -> list[float]:
        """Per-token oracle terms of the response's words (unknown tokens score 0 and break bigrams)."""
        topic, ids = self._topic(prompt), self._ids(response)
        terms = []
        for t, w in enumerate(ids[: self.max_response_len]):
            r = self._score[topic, w]
            if t > 0:
                r += self._bigram[ids[t - 1], w]
            terms.append(float(r))
        return terms

    def reward(self, prompt: str, response: str) -> float:
        return float(sum(self.reward_terms(prompt, response)))

    def optimum(self, prompt: str) -> float:
        """Best achievable r* for the prompt: Viterbi over lengths 0..max_response_len."""
        topic = self._topic(prompt)
        best_end = self._score[topic].copy()  # best total ending in word w at length 1
        best = max(0.0, float(best_end.max()))
        for _ in range(1, self.max_response_len):
            best_end = (best_end[:, None] + self._bigram).max(0) + self._score[topic]
            best = max(best, float(best_end.max()))
        return best

    # --- data -----------------------------------------------------------------------------
    def sample_prompt(self, rng: random.Random) -> str:
        words = rng.choices(self.words, k=self.context_len)
        return " ".join([rng.choice(self.topics)] + words + ["="])

    def prompts(self, n: int, seed: int = 1) -> list[str]:
        rng = random.Random(self.seed * 1_000_003 + seed)
        return [self.sample_prompt(rng) for _ in range(n)]

    def teacher_response(self, prompt: str, rng: random.Random) -> str:
        topic = self._topic(prompt)
        logits = self._score[topic] / self.teacher_temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        length = rng.randint(2, self.max_response_len)
        return " ".join(rng.choices(self.words, weights=probs.tolist(), k=length))

    def sft_corpus(self, n: int, seed: int = 2) -> list[dict]:
        """``{"prompt", "response"}`` records from the weak teacher."""
        rng = random.Random(self.seed * 1_000_003 + seed)
        out = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            out.append({"prompt": p, "response": self.teacher_response(p, rng)})
        return out

    def label(self, prompt: str, a: str, b: str, rng: random.Random) -> dict:
        """A Bradley-Terry preference between two responses: ``{"prompt", "chosen", "rejected"}``."""
        margin = self.bt_beta * (self.reward(prompt, a) - self.reward(prompt, b))
        p_a = 1.0 / (1.0 + math.exp(-max(min(margin, 50.0), -50.0)))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
