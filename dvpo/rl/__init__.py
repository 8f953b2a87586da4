"""On-policy RL building blocks shared by ``dvpo dvpo`` and ``dvpo ppo``: config sections, rollout
experience, the policy update, the KL controller, the step skeleton, and the unfused reference path."""
from . import unfused
from .actor import ActorUpdater, LossTerms, NonFiniteError, mini_batch_rows, policy_loss_on, updates_per_step
from .config import ActorConfig, KLConfig, PromptDataConfig, RolloutConfig
from .experience import (
    Experience,
    encode_prompts,
    last_state_values,
    micro_batches,
    policy_logprobs,
    sequence_scores,
    state_slice,
    state_values,
)
from .kl import KLController
from .scoring import sample_and_score
from .step import RolloutStep, Timer, check_same_vocabulary, frozen, frozen_policy, frozen_value_model
from .whiten import batch_whiten

__all__ = [
    "ActorConfig", "ActorUpdater", "Experience", "KLConfig", "KLController", "LossTerms", "NonFiniteError",
    "PromptDataConfig", "RolloutConfig", "RolloutStep", "Timer", "batch_whiten", "check_same_vocabulary",
    "encode_prompts", "frozen", "frozen_policy", "frozen_value_model", "last_state_values", "micro_batches",
    "mini_batch_rows", "policy_logprobs", "policy_loss_on", "sample_and_score", "sequence_scores", "state_slice",
    "state_values", "unfused", "updates_per_step",
]
