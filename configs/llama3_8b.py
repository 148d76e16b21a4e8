"""A Llama-3-8B-shaped run, for pod planning: `jit-tune compile --config
configs/llama3_8b.py --topology v5p:4x4x8` compiles its train step for that slice on any
machine and reports per-chip memory and FLOPs. To train it, point model.init_from at a
Llama-3-8B Hugging Face directory (the architecture, weights and tokenizer then come
from there) and data.* at your mixture.

    jit-tune compile --config configs/llama3_8b.py --topology v5p:4x4x8
"""

from jit_tune.config import default_config


VARIANTS = ()  # `llama3_8b.py:VARIANT`; load_config rejects others


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
    return config
