"""A Llama-3-8B-shaped run, for pod planning: `jit-tune compile --config
configs/llama3_8b.py --topology v5p:4x4x8` compiles its train step for that slice on any
machine and reports per-chip memory and FLOPs. To train it, point model.init_from at a
Llama-3-8B Hugging Face directory (the architecture, weights and tokenizer then come
from there) and data.* at your mixture.

    jit-tune compile --config configs/llama3_8b.py --topology v5p:4x4x8

Variants, for parameter-efficient tuning (they need model.init_from to train, not to
compile):
  lora    rank-16 LoRA adapters on every attention and MLP projection (42M parameters,
          0.5% of the model), the only ones trained: the optimizer holds their moments
          alone; the frozen base in bfloat16. Same data as full fine-tuning, to compare
          the two on a slice.
  qlora   the same adapters on an NF4 base (QLoRA), on one chip: 16 x 2k-token rows a
          step, accumulated one row at a time.

    jit-tune compile --config configs/llama3_8b.py:qlora --topology v5e:1x1   # fits a 16 GiB chip
    jit-tune compile --config configs/llama3_8b.py --topology v5e:1x1         # full fine-tuning does not
"""

from jit_tune.config import default_config


VARIANTS = ("lora", "qlora")  # `llama3_8b.py:VARIANT`; load_config rejects others


def get_config(variant: str | None = None):
    config = default_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers = 128_256, 4096, 32
    m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim = 32, 8, 128, 14_336
    m.rope_theta, m.rope_scaling, m.rope_factor = 500_000.0, "llama3", 8.0
    m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_position = 1.0, 4.0, 8192
    m.dtype, m.param_dtype = "bfloat16", "float32"  # bf16 compute, f32 master weights and moments
    m.remat = "full"
    m.scan_layers = True  # compiles in a third of the time of 32 unrolled layers, and needs less memory
    config.data.seq_len = 8192
    config.data.batch_size = 128  # 1M tokens a step
    config.mesh.shape.update(data=1, fsdp=-1, tensor=1)  # ZeRO-3 style: everything sharded over all chips
    config.optimizer.lr = 2e-5
    config.optimizer.warmup_steps = 100
    config.train.steps = 2000
    if variant in ("lora", "qlora"):
        m.param_dtype = "bfloat16"  # the frozen base needs no float32 master copy (adapters are float32)
        config.lora.rank, config.lora.alpha, config.lora.dropout = 16, 32.0, 0.05
        config.optimizer.lr = 2e-4  # LoRA's usual rate: adapters start at zero
    if variant == "qlora":
        config.lora.base_quantization = "nf4"
        config.data.seq_len, config.data.batch_size = 2048, 16
        config.train.microbatches = 16
    return config
