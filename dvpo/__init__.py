"""dvpo: the trainer layer (data, models, GVM, DVPO and baseline stages, CLI) on top of dvpo_kernels."""
