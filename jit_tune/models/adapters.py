"""LoRA adapters out as PEFT writes them, for `peft.PeftModel.from_pretrained` on the
transformers base model and for servers (vLLM's --enable-lora --lora-modules NAME=DIR).

A PEFT adapter directory holds adapter_config.json and adapter_model.safetensors, with
one pair of tensors per adapted module, named after the transformers module:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]
    base_model.model.model.embed_tokens.lora_embedding_A               [r, vocab]
    base_model.model.model.embed_tokens.lora_embedding_B               [d_model, r]

Ours are A [in..., r] and B [r, out...] with in and out flattened in row-major order,
the order hf.py's weight layouts flatten them in, so A and B are only reshaped and
transposed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jit_tune.models import hf
from jit_tune.models.decoder import Decoder
from jit_tune.models.lora import adapter

PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def adapter_tensors(model: Decoder, dtype: str = "float32") -> dict[str, np.ndarray]:
    """PEFT's tensor name -> array, for every adapter of `model`."""
    config = model.config
    names = hf.weight_names(config)
    tensors = {}
    for path, module in nnx.iter_modules(model):
        for weight_name in list(vars(module)):
            lora = adapter(module, weight_name)
            if lora is None:
                continue
            a, b = (np.asarray(jax.device_get(p[...]), np.float32) for p in lora)
            stacked = config.scan_layers and path[:1] == ("blocks",)
            layers = [(("blocks", i) + path[1:], a[i], b[i]) for i in range(config.n_layers)] if stacked \
                else [(path, a, b)]
            for layer_path, a_layer, b_layer in layers:
                module_name = names[(*layer_path, weight_name)][0].removesuffix(".weight")
                r = a_layer.shape[-1]
                a_t = a_layer.reshape(-1, r).T  # [r, in_features]
                b_t = b_layer.reshape(r, -1).T  # [out_features, r]
                if module_name.endswith("embed_tokens"):
                    pair = {"lora_embedding_A": a_t, "lora_embedding_B": b_t}
                else:
                    pair = {"lora_A.weight": a_t, "lora_B.weight": b_t}
                for suffix, array in pair.items():
                    tensors[f"{PREFIX}{module_name}.{suffix}"] = np.ascontiguousarray(array.astype(DTYPES[dtype]))
    return tensors


def target_modules(tensors: dict[str, np.ndarray]) -> list[str]:
    """The transformers module names adapted (q_proj, ..., embed_tokens, lm_head)."""
    return sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})


def save_peft_adapter(model: Decoder, directory: str | Path, base_model: str, dtype: str = "float32") -> None:
    """adapter_config.json and adapter_model.safetensors of `model`'s adapters, for the
    transformers model `base_model` names (written as base_model_name_or_path)."""
    lora = model.config.lora
    tensors = adapter_tensors(model, dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": lora.rank,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules(tensors),
        "bias": "none",
        "fan_in_fan_out": False,  # weights are [out, in], as torch.nn.Linear's
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,  # the scale is alpha / r
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
