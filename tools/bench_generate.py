"""Cached greedy generation speed: jit_tune against transformers' `generate`, same model,
same prompts, same process.

    .venv/bin/python tools/bench_generate.py [--hidden 512] [--layers 8] [--batch 8] [--new-tokens 64]

Builds a Llama-architecture model with random weights in transformers (float32), saves
it, loads it into jit_tune, checks that both produce the same tokens, and prints
generated tokens per second for each (after one warm-up run, so jit_tune's compile time
is reported separately). Needs the test extra (torch).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from jit_tune import mesh as mesh_lib
from jit_tune.config import default_config
from jit_tune.distributed import choose_platform
from jit_tune.eval.decode import generate
from jit_tune.models.loading import load_hf_decoder


def main() -> None:
    choose_platform()  # no libtpu probing on a machine without TPUs
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512,
                        help="a multiple of 256: heads of 64, a key-value head per 4 query heads")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.hidden <= 0 or args.hidden % 256:
        parser.error(f"--hidden {args.hidden}: expected a positive multiple of 256 (heads of 64, 4 per key-value head)")

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256,
        head_dim=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, args.vocab, size=n).tolist() for n in rng.integers(8, 40, size=args.batch)]

    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        defaults = default_config()
        model = load_hf_decoder(directory, mesh_lib.make_mesh(defaults), mesh_lib.logical_rules(defaults))

    def ours():
        return generate(model, prompts, args.new_tokens, eos_id=-1, pad_id=0, batch=args.batch)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def theirs():
        with torch.no_grad():
            out = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return out[:, width:].tolist()

    start = time.perf_counter()
    ours_tokens = ours()
    compile_s = time.perf_counter() - start
    theirs_tokens = theirs()
    matches = sum(a == b for a, b in zip(ours_tokens, theirs_tokens))

    timings = {}
    for name, fn in (("jit_tune", ours), ("transformers", theirs)):
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start

    n_params = sum(p.numel() for p in reference.parameters())
    generated = args.batch * args.new_tokens
    print(f"model: Llama-style, {n_params / 1e6:.1f}M params, float32; batch {args.batch} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new_tokens} new tokens each")
    print(f"devices: jax {jax.devices()[0].platform} x{jax.device_count()}, torch threads {torch.get_num_threads()}")
    print(f"identical greedy tokens: {matches}/{args.batch} prompts")
    print(f"jit_tune first call (compile + run): {compile_s:.1f} s")
    for name, seconds in timings.items():
        print(f"{name:>12}: {generated / seconds:8.1f} tokens/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
