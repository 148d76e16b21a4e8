"""Model FLOPs of training, and each accelerator's peak: what MFU divides.

Training FLOPs per token, counted as MaxText counts them
(`calculate_tflops_training_per_device` in AI-Hypercomputer/maxtext,
src/MaxText/maxtext_utils.py), which is PaLM's count (Chowdhery et al. 2022, appendix B)
with causal attention halved:

    6 x (W + d_model x vocab_size)  +  6 x n_layers x n_heads x head_dim x seq_len

- W, the blocks' matmul weights: n_layers x (d_model x head_dim x (n_heads + 2 x n_kv_heads)
  (q, k, v) + n_heads x head_dim x d_model (o) + 3 x d_model x mlp_dim (gate, up, down)).
  A weight costs 2 FLOPs per token forward and 4 backward: hence 6.
- d_model x vocab_size: the unembedding matmul, tied or not. The embedding lookup is not
  a matmul and is not counted.
- Attention: q.k and probs.v are 2 x 2 x seq_len x n_heads x head_dim FLOPs per token
  and layer forward, 3 times that with the backward pass: 12 x n_heads x head_dim x
  seq_len, PaLM's term. Causal masking leaves half of it to do, so it is HALVED here, as
  MaxText does (PaLM does not halve). A sliding layer attends min(window, seq_len) keys.

Not counted: norms, biases, RoPE, softmax and other elementwise work; remat's
recomputation (these are model FLOPs, not hardware FLOPs); and nothing is subtracted
for padding: the loop counts every token slot of a batch, which the device computes
whatever it holds (data/packing_efficiency says how many were real).

`jit-tune compile` reports this count beside XLA's, and the training loop logs
TFLOP/s per device and MFU from it; both call `training_flops_per_token`.
"""

from __future__ import annotations

import re

from jit_tune.models.decoder import DecoderConfig


def training_flops_per_token(config: DecoderConfig, seq_len: int) -> float:
    """Forward and backward FLOPs per token of a row of `seq_len` tokens (see above)."""
    c = config
    attention_weights = c.d_model * c.head_dim * (c.n_heads + 2 * c.n_kv_heads) + c.n_heads * c.head_dim * c.d_model
    weights = c.n_layers * (attention_weights + 3 * c.d_model * c.mlp_dim) + c.d_model * c.vocab_size
    keys = sum(min(c.sliding_window, seq_len) if c.is_sliding(layer) else seq_len for layer in range(c.n_layers))
    return 6.0 * weights + 6.0 * c.n_heads * c.head_dim * keys


# Peak dense bf16 FLOP/s of one JAX device (a chip: v4 and v5p chips are one megacore
# device), by device_kind, first match wins. NVIDIA's datasheets headline 2:4 sparse
# numbers, twice the dense ones given here.
PEAK_BF16_TFLOPS = (
    ("TPU v4", 275.0),  # cloud.google.com/tpu/docs/v4: peak compute per chip (bf16) 275 TFLOPs
    ("TPU v5 lite", 197.0),  # v5e (its device_kind): cloud.google.com/tpu/docs/v5e, 197 TFLOPs
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),  # cloud.google.com/tpu/docs/v5p: 459 TFLOPs
    ("TPU v5", 459.0),  # v5p's device_kind
    ("TPU v6 lite", 918.0),  # v6e, Trillium (its device_kind): cloud.google.com/tpu/docs/v6e, 918 TFLOPs
    ("TPU v6e", 918.0),
    ("A100", 312.0),  # nvidia.com A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 sparse)
    ("H100 PCIe", 756.0),  # H100 datasheet: PCIe 1,513 TFLOPS sparse
    ("H100 NVL", 835.0),  # H100 datasheet: NVL 1,671 TFLOPS sparse
    ("H100", 989.0),  # H100 datasheet: SXM 1,979 TFLOPS sparse ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),  # H200 datasheet: NVL 1,671 TFLOPS sparse
    ("H200", 989.0),  # H200 datasheet: SXM 1,979 TFLOPS sparse
    ("B200", 2250.0),  # HGX B200 specifications: FP16/BF16 Tensor Core 4.5 PFLOPS sparse per GPU
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device of this kind (jax's device_kind), or None
    (CPUs, and accelerators not in the table): no MFU is then reported."""
    for name, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", device_kind, re.IGNORECASE):
            return tflops * 1e12
    return None
