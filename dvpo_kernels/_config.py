"""Tunables shared by every backend."""
import os

# Largest [rows, vocab] block the chunked paths materialise, in elements. 2**24 fp32 elements
# is 64 MiB: big enough for GEMM efficiency, small enough that no path ever holds [N, V].
MAX_BLOCK_ELEMENTS = int(os.environ.get("DVPO_KERNELS_MAX_BLOCK_ELEMENTS", 1 << 24))

# Vocab slice of memory="lean": each slice's dW comes from one GEMM over all tokens.
LEAN_VOCAB_SLICE = int(os.environ.get("DVPO_KERNELS_LEAN_VOCAB_SLICE", 8192))


def set_max_block_elements(n: int) -> int:
    """Set the block budget (elements); returns the previous value."""
    global MAX_BLOCK_ELEMENTS
    if int(n) < 1:
        raise ValueError(f"max block elements must be >= 1, got {n}")
    old, MAX_BLOCK_ELEMENTS = MAX_BLOCK_ELEMENTS, int(n)
    return old
