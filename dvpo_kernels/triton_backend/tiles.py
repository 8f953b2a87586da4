"""Chunk and tile sizes of the Triton backend, read at call time (tests shrink them)."""
import os

import torch
import triton

from .. import _config

# Vocab tile of the row kernels: 4096 logits per load (8 KiB of bf16) and 8 warps keep enough
# bytes in flight per SM for these bandwidth-bound passes.
ROW_BLOCK = 4096
# Tokens per program of the elementwise policy-loss kernel.
TOKEN_BLOCK = 1024
# Bytes of the one [rows, V] logits block on a GPU. Speed mode reads and writes the fp32 [V, H]
# dW accumulator once per block with a GEMM whose K is the block's row count, so rows must be
# ~1000 for that traffic to hide under the GEMM's flops: 2**28 bytes is 883 bf16 rows at
# V = 151936. (_config.MAX_BLOCK_ELEMENTS, 64 MiB of fp32 by default, sizes CPU blocks.)
GPU_BLOCK_BYTES = int(os.environ.get("DVPO_KERNELS_GPU_BLOCK_BYTES", 1 << 28))


def block_elements(t: torch.Tensor) -> int:
    """Elements of ``t``'s dtype one logits block may hold."""
    if t.is_cuda:
        return max(1, GPU_BLOCK_BYTES // t.element_size())
    return max(1, _config.MAX_BLOCK_ELEMENTS)


def token_rows(t: torch.Tensor, n: int, width: int) -> int:
    """Rows per token chunk of a [rows, width] logits block (padded rows, see row_stride)."""
    return max(1, min(n, block_elements(t) // row_stride(max(width, 1))))


def vocab_slice(t: torch.Tensor, n: int, v: int) -> int:
    """Width of a lean-mode vocab slice, whose [n, width] block spans every token; wide slices are
    a multiple of 64 so that rows stay aligned for vector loads and the GEMMs."""
    width = max(1, min(v, _config.LEAN_VOCAB_SLICE, block_elements(t) // max(n, 1)))
    return width if width < 128 or width == v else width // 64 * 64


def row_stride(width: int) -> int:
    """Row stride of a logits block: ``width`` rounded up to 16 elements, so that every row starts
    16-element aligned and Triton vectorises the row kernels' loads whatever the vocab size."""
    return -(-width // 16) * 16


def row_launch(width: int) -> dict:
    """BLOCK_V and num_warps of a row kernel over ``width`` columns."""
    block = min(ROW_BLOCK, triton.next_power_of_2(max(width, 1)))
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
