"""Drop-in adapters for the trainers our users already run.

Each submodule imports its framework lazily, so ``import dvpo_kernels.integrations`` needs neither:
``transformers`` (any Hugging Face causal LM), ``verl`` (an ``external_lib``), ``trl`` and ``openrlhf``.
"""
