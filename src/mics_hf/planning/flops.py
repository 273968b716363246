"""Throughput arithmetic: TFLOPS per GPU under the conventions the MiCS line of work reports, MFU, and
model-state memory per rank.

[Note: which TFLOPS a number is]
The same run gives three different "TFLOPS per GPU" depending on how model FLOPs are counted, so every figure
must say which one it uses (the MiCS paper and its TFLOPS convention):

- 8N (``tflops_per_gpu(..., factor=8)``, the paper's and AWS's convention): 6N for forward + backward plus 2N
  for recomputing the forward under activation checkpointing; attention scores are not counted. BloombergGPT's
  102 TFLOPS/GPU reproduces exactly with it.
- 6N (``factor=6``): the usual convention (Kaplan et al., PaLM's MFU without recomputation); what DeepSpeed's
  RoBERTa numbers use.
- Megatron (``megatron_tflops_per_gpu``): counts every matmul including attention scores and the logits layer,
  and the recomputed forward when checkpointing.

Nothing here touches a device or torch.distributed: these are plain functions of numbers, shared by the
training recipes (to log throughput) and the cost model (to predict it).
"""

from __future__ import annotations

import torch

__all__ = [
    "PEAK_TFLOPS",
    "megatron_tflops_per_gpu",
    "mfu",
    "model_state_bytes_per_rank",
    "peak_tflops",
    "tflops_per_gpu",
]


def _require_positive(**values: float) -> None:
    """Raise a ValueError naming every argument that is not > 0 (a zero time or GPU count is a caller bug)."""
    bad = {name: value for name, value in values.items() if not value > 0}
    if bad:
        listed = ", ".join(f"{name}={value!r}" for name, value in bad.items())
        raise ValueError(f"{listed}: must be > 0 (pass the measured quantity, not a placeholder)")


def tflops_per_gpu(n_params: int, tokens: float, seconds: float, num_gpus: int, *, factor: int = 8) -> float:
    """Model TFLOPS per GPU counted as ``factor * n_params * tokens`` floating-point operations.

    factor=8 is the paper's convention: 6N per token for forward + backward plus 2N for the forward that
    activation checkpointing recomputes, attention scores excluded. factor=6 is the usual convention (no
    recomputation counted). ``tokens`` are all tokens processed by all GPUs in ``seconds`` (for one step:
    global batch in sequences x sequence length).
    """
    _require_positive(n_params=n_params, tokens=tokens, seconds=seconds, num_gpus=num_gpus, factor=factor)
    return factor * n_params * tokens / seconds / num_gpus / 1e12


def megatron_tflops_per_gpu(
    *,
    batch: int,
    seq: int,
    layers: int,
    hidden: int,
    vocab: int,
    seconds: float,
    num_gpus: int,
    checkpointing: bool = True,
) -> float:
    """TFLOPS per GPU with the Megatron-LM formula (Narayanan et al., SC'21, appendix), for a GPT-style model.

    With activation checkpointing: ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``; without: ``72 B s l h^2
    (1 + s/(6h) + V/(12 l h))``. ``batch`` is the global batch in sequences processed in ``seconds``.

    Why the logits term changes denominator: a transformer layer's forward costs 24 B s h^2 (1 + s/(6h)) and
    runs 3x (forward + backward) or 4x (plus the recomputed forward); the logits layer costs 2 B s h V forward
    and is never recomputed, so it is 6 B s h V in both cases. Factoring out 96 or 72 B s l h^2 gives V/(16lh)
    or V/(12lh).
    """
    _require_positive(
        batch=batch, seq=seq, layers=layers, hidden=hidden, vocab=vocab, seconds=seconds, num_gpus=num_gpus
    )
    layer_passes = 4 if checkpointing else 3
    transformer_flops = layer_passes * 24 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden))
    logits_flops = 6 * batch * seq * hidden * vocab
    return (transformer_flops + logits_flops) / seconds / num_gpus / 1e12


# Dense (no structured sparsity) tensor-core peak per GPU, in TFLOPS, by compute dtype. A dtype a GPU's tensor
# cores do not support (V100 has no bf16) is absent, so its peak is unknown (None), not zero.
# Sources (NVIDIA datasheets; they print sparse figures with an asterisk, the dense figure is half of those):
# - V100: "NVIDIA Tesla V100 GPU Accelerator" datasheet: Tensor Performance 125 TFLOPS (SXM2), 112 (PCIe).
# - A100: "NVIDIA A100 Tensor Core GPU" datasheet: BF16/FP16 Tensor Core 312 TFLOPS (SXM and PCIe, 40GB and
#   80GB). The paper's percentages use 312 (170 TFLOPS = 54.5%).
# - H100: "NVIDIA H100 Tensor Core GPU" datasheet: BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity on SXM
#   (989 dense), 1,513 on PCIe (756 dense).
# - H200: "NVIDIA H200 Tensor Core GPU" datasheet: BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity on SXM
#   (989 dense); the compute die is the H100's.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "v100-pcie": {"fp16": 112.0},
    "v100": {"fp16": 125.0},
    "a100": {"bf16": 312.0, "fp16": 312.0},
    "h100-pcie": {"bf16": 756.0, "fp16": 756.0},
    "h100": {"bf16": 989.0, "fp16": 989.0},
    "h200": {"bf16": 989.0, "fp16": 989.0},
}

# (PEAK_TFLOPS key, substrings that must all occur in the lower-cased device name). Ordered most specific
# first, because "NVIDIA H100 PCIe" also contains "h100". "gh200" contains "h200", which is right: a Grace
# Hopper superchip's GPU has the H100/H200 die and the same 989 peak.
_NAME_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("v100-pcie", ("v100", "pcie")),
    ("v100", ("v100",)),
    ("a100", ("a100",)),
    ("h100-pcie", ("h100", "pcie")),
    ("h100", ("h100",)),
    ("h200", ("h200",)),
)

_DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
}


def _normalise_dtype(dtype: str | torch.dtype) -> str:
    """Map "bfloat16", torch.bfloat16, "half", ... to the PEAK_TFLOPS dtype keys ("bf16", "fp16")."""
    key = str(dtype).lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(
            f"dtype={dtype!r} has no tensor-core peak in PEAK_TFLOPS; use one of "
            f"{sorted(set(_DTYPE_ALIASES.values()))} (or torch.bfloat16 / torch.float16)"
        )
    return _DTYPE_ALIASES[key]


def peak_tflops(device_name: str, dtype: str | torch.dtype = "bf16") -> float | None:
    """Dense peak TFLOPS of one GPU for ``dtype``, from a device name such as ``torch.cuda.get_device_name()``.

    Matches case-insensitively on substrings ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3", "Tesla
    V100-SXM2-32GB"). Returns None for an unknown GPU or a dtype it has no tensor cores for, so callers log
    "MFU unknown" instead of a wrong percentage.
    """
    dtype_key = _normalise_dtype(dtype)
    name = device_name.lower()
    for key, needles in _NAME_PATTERNS:
        if all(needle in name for needle in needles):
            return PEAK_TFLOPS[key].get(dtype_key)
    return None


def mfu(tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.545, not 54.5): achieved TFLOPS / peak; None if peak unknown.

    The result inherits the convention of ``tflops`` (8N, 6N or Megatron), so report which one was used.
    """
    if peak is None:
        return None
    _require_positive(peak=peak)
    return tflops / peak


def model_state_bytes_per_rank(n_params: int, partition_size: int, *, bytes_per_param: int = 16) -> float:
    """Bytes of model states (parameters, gradients, optimizer states) each rank holds under MiCS.

    Mixed-precision Adam keeps 16 bytes per parameter (fp16/bf16 parameter 2 + gradient 2, fp32 master 4 +
    momentum 4 + variance 4; mics_hf's own split, fp32 master shard + fp32 gradient shard + momentum + variance,
    is also 16); MiCS shards one replica over the p ranks of a partition group, so 16P/p. With
    p = world size this is ZeRO-3's 16P/N; p = 1 is DDP's 16P. Activations, gathered-parameter buffers and
    allocator fragmentation come on top.
    """
    _require_positive(n_params=n_params, partition_size=partition_size, bytes_per_param=bytes_per_param)
    return bytes_per_param * n_params / partition_size
