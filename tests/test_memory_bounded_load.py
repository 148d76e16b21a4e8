"""Import reads only the blocks a process's devices hold.

Four processes (2 CPU devices each, one 8-device fsdp mesh) load a ~0.9 GB float32
checkpoint. Each must end up holding a quarter of it, and its resident memory may rise
by at most half the model size while loading (the cap this test enforces): reading
whole tensors, or memory-mapping the file, breaks it.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from multihost import spawn

CAP_SHARE = 0.5
PROCESSES = 4


def _write_checkpoint(directory: Path) -> int:
    rng = np.random.default_rng(0)
    d, f, v, layers = 2048, 5632, 32000, 2
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": layers,
              "intermediate_size": f, "vocab_size": v, "hidden_act": "silu", "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (d, d)
        shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    weight_map, total = {}, 0
    names = sorted(shapes)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        file = f"model-{i:05d}-of-00002.safetensors"
        tensors = {n: rng.standard_normal(shapes[n], dtype=np.float32) for n in part}
        save_file(tensors, str(directory / file))
        weight_map.update({n: file for n in part})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def test_each_process_reads_only_its_shards(tmp_path):
    model_bytes = _write_checkpoint(tmp_path)
    reports = spawn("load_worker.py", PROCESSES, str(tmp_path))
    for report in reports:
        assert abs(report["local_bytes"] - model_bytes / PROCESSES) < 0.01 * model_bytes
        growth = report["growth"]
        print(f"process memory rose {growth / 2**20:.0f} MiB, holding {report['local_bytes'] / 2**20:.0f} MiB "
              f"of a {model_bytes / 2**20:.0f} MiB model")
        assert growth < CAP_SHARE * model_bytes, (
            f"peak memory grew by {growth / 2**20:.0f} MiB loading a {model_bytes / 2**20:.0f} MiB model"
        )
