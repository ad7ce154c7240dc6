"""GPU out-of-memory, recognised from text: what PyTorch, cuBLAS, cuDNN, the CUDA runtime,
TensorFlow and XLA print when a device allocation fails.

Owns the one list of signatures. `report.is_gpu_oom` matches an exception's text with it (an
OOM raised as a plain RuntimeError, by cuBLAS or cuDNN, inside `report.session`); the supervisor
matches each line a member prints (a program that never enters `report.session`, or dies of an
OOM outside Python), so a member whose cap is too small ends as GPUOutOfMemory either way. Host
memory exhaustion (Python's MemoryError, numpy's "Unable to allocate", a TensorFlow OOM on a CPU
device) is not a GPU OOM and matches nothing here. Pure; imports no framework.
"""

from __future__ import annotations

import re

# Each is a fragment of a real message; the comments name who prints it.
_SIGNATURES = (
    # PyTorch's caching allocator: torch.OutOfMemoryError (torch.cuda.OutOfMemoryError) and the
    # RuntimeError of older releases, "CUDA out of memory. Tried to allocate 2.00 GiB ...".
    r"CUDA out of memory",
    # The CUDA runtime through PyTorch ("CUDA error: out of memory"), the driver API
    # (TensorFlow's "failed to allocate ... from device: CUDA_ERROR_OUT_OF_MEMORY") and the
    # runtime's error name.
    r"CUDA error: out of memory",
    r"CUDA_ERROR_OUT_OF_MEMORY",
    r"cudaErrorMemoryAllocation",
    # cuBLAS and cuDNN failing to get their workspace on the device.
    r"CUBLAS_STATUS_ALLOC_FAILED",
    r"CUDNN_STATUS_ALLOC_FAILED",
    r"CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    # TensorFlow's ResourceExhaustedError names the device: on a CPU device it is host memory.
    r"OOM when allocating tensor.*(device:GPU|allocator GPU_\d+_bfc)",
    # TensorFlow's BFC allocator of a GPU (its warning that the caller copes is excluded below).
    r"Allocator \(GPU_\d+_bfc\) ran out of memory",
    # XLA (TensorFlow's jit_compile, JAX) on a device.
    r"RESOURCE_EXHAUSTED: Out of memory while trying to allocate",
)
GPU_OOM = re.compile("|".join(f"(?:{s})" for s in _SIGNATURES))
# TensorFlow logs a failed allocation it recovers from (it retries smaller) with this sentence.
_NOT_A_FAILURE = "The caller indicates that this is not a failure"


def is_gpu_oom_text(text: str) -> bool:
    """Whether `text` (an exception's message, a line of output) reports a failed GPU
    allocation."""
    return GPU_OOM.search(text) is not None and _NOT_A_FAILURE not in text
