import os

# Triton kernels run under the interpreter on CPU-only machines; the flag must be set before
# triton decorates any kernel, so it is set before the package is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
