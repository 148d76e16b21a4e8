"""What a resumed run may change, checked before anything is restored or written.

A resume compares the config it is given with the one saved in the checkpoint (each
checkpoint records its run's config). Changes to what the checkpoint fixes are an error
naming every such field; every other change is applied and listed, so a resume never
silently trains on something other than what its command says.

Fixed by the checkpoint:
  model.*           the architecture and parameter dtype: the saved state has their
                    shapes (except model.dtype, model.remat, model.init_from and
                    model.max_position_embeddings, which do not change the state)
  lora.*            the adapters' shapes and the base's storage (except lora.dropout)
  seed              the data order and initialization derive from it
  data.tokenizer*, data.chat_template, data.builtin_seed
                    the token ids the parameters were trained on
  data.seq_len, data.packing, data.packing_bins, data.workers
                    the shape of the saved data-iterator state
  (data.streams is checked against the checkpoint's stream count by the loop)
Applied on resume: everything else, e.g. the mixture, tasks and groups, train.steps,
the optimizer's learning rate and schedule, eval, logging and checkpoint cadence, the
mesh (the state is restored onto any mesh).
"""

from __future__ import annotations

FIXED = ("model.", "lora.", "seed", "data.tokenizer", "data.chat_template", "data.builtin_seed", "data.seq_len",
         "data.packing", "data.workers")
NOT_FIXED = ("model.dtype", "model.remat", "model.init_from", "model.max_position_embeddings", "lora.dropout")


class ResumeError(ValueError):
    pass


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_fixed(key: str) -> bool:
    return key.startswith(FIXED) and not key.startswith(NOT_FIXED)


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, new value) for every field that differs; a field only one of
    them has shows None on the other side."""
    before, after = _flatten(saved), _flatten(new)
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def check_resume(saved: dict, new: dict, where: str) -> list[str]:
    """Lines describing the applied changes; a ResumeError naming any fixed field that changed."""
    if "lora" not in saved:  # saved before LoRA existed: trained without it
        from jit_tune.config import config_to_dict, default_config

        saved = {**saved, "lora": config_to_dict(default_config())["lora"]}
    changes = config_changes(saved, new)
    fixed = [f"config.{key}: {old!r} -> {value!r}" for key, old, value in changes if is_fixed(key)]
    if fixed:
        raise ResumeError(
            f"{where}: these fields cannot change on resume (the checkpoint fixes them):\n  " + "\n  ".join(fixed)
            + "\nResume with the saved config (omit --config, or set these back), or start a new workdir.")
    return [f"config.{key}: {old!r} -> {value!r}" for key, old, value in changes]
