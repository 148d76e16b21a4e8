"""A Llama-3.2-1B-shaped model on the built-in data, packed rows of 4,096 tokens, bf16
compute over float32 master weights: the GPU benchmark of the performance work (tokens/s,
MFU and a profile of one step, for each attention implementation), on one device.

    bash tools/bench_gpu.sh   # parity tests on the GPU, then the kernels, pallas_gpu's tiles, profiles
    python tools/bench_train_step.py --config configs/llama3_1b.py --attention pallas_gpu,xla_chunked \
        --variant "model.attention=pallas_gpu model.attention_blocks.q_dkv=64 ..."

Random weights: the shape is what is measured. To fine-tune the real model, point
model.init_from at a Llama-3.2-1B Hugging Face directory and data.* at your mixture.
"""

from jit_tune.config import default_config


def get_config():
    config = default_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers = 128_256, 2048, 16
    m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim = 32, 8, 64, 8192
    m.tie_embeddings = True
    m.rope_theta, m.rope_scaling, m.rope_factor = 500_000.0, "llama3", 32.0
    m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_position = 1.0, 4.0, 8192
    m.dtype, m.param_dtype = "bfloat16", "float32"
    # 4 x 4k tokens a step without rematerialization: 40.8 GiB per chip as `jit-tune
    # compile --config configs/llama3_1b.py --topology v5p:1x1x1` plans it, so an 80 GB
    # H100 holds it; raise batch_size on an H200. Remat would lower MFU, which counts
    # model FLOPs only.
    config.data.seq_len, config.data.batch_size = 4096, 4
    # One process renders and packs 38.7k tokens/s of these rows (53.8k with 2 workers on
    # 2 cores; tools/bench_pipeline.py, a Zen 3 core); 50% MFU on an H200 eats about 60k.
    config.data.workers = 8
    config.mesh.shape.update(data=-1, fsdp=1, tensor=1)
    config.optimizer.warmup_steps = 10
    config.train.steps = 100
    return config
