"""Orbax checkpoints of the whole run state: params, optimizer state (with the step) and
every data stream's position, so that a resume continues with exactly the next batch.

With LoRA, "params" are the adapters alone (what is trained, `lora.trainable`): the
frozen base is not copied into every checkpoint but recorded by a fingerprint of
model.init_from, which a restore checks before reading the base from there again.

Saves are atomic (Orbax writes to a temporary directory and renames it), so an
interrupted save never replaces the last good checkpoint, and a state that is not
finite is never saved: the loss of step N is computed before update N, so a finite
loss can come with an update that leaves NaN or inf parameters.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from jit_tune.config import ConfigError, config_to_dict
from jit_tune.data.streams import StreamsRestore, StreamsSave, saved_stream_count
from jit_tune.models.loading import base_fingerprint
from jit_tune.models.lora import trainable


class NonFiniteState(FloatingPointError):
    pass


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree) -> bool:
    """Whether every float in a (possibly multi-host) tree of arrays is finite."""
    return bool(np.asarray(_all_finite(tree).addressable_data(0)))


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from, outermost first."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"blocks/0/mlp/up_DxF": shape} of a tree of arrays or of Orbax's array metadata
    (whose keys are strings where the model's may be integers)."""
    return {"/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
    def __init__(self, directory: Path, keep: int, keep_every: int = 0, config: ConfigDict | None = None):
        """Keeps the last `keep` checkpoints, and every one whose step is a multiple of
        `keep_every` (0: none). With the run's `config`, each save also records it, with
        the process and device counts that wrote it (`saved_run`)."""
        self.config = config
        self._base = None  # the fingerprint of a LoRA run's base, taken at the first save
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, data_iterator) -> None:
        """Save `step`, unless its state holds a NaN or inf (NonFiniteState: the last
        good checkpoint stays the latest)."""
        state = {"model": nnx.to_pure_dict(nnx.state(model, trainable(model.config))),
                 "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
        if not all_finite(state):
            good = self.latest_step()
            raise NonFiniteState(
                f"step {step}: the parameters or optimizer state are not finite after the update (the update "
                f"diverged, e.g. from too high a learning rate); not saved: "
                + (f"the last good checkpoint, step {good}, is kept" if good is not None else "no checkpoint was saved"))
        items = {"state": ocp.args.StandardSave(state), "data": StreamsSave(data_iterator)}
        if self.config is not None:
            # The data order and initialization derive from config.seed; the step draws no
            # random numbers, so the config is the whole of the run's RNG state.
            run = {"config": config_to_dict(self.config),
                   "process_count": jax.process_count(), "device_count": jax.device_count()}
            if self.config.lora.rank:  # the adapters' base
                if self._base is None:
                    self._base = base_fingerprint(self.config.model.init_from)
                run["base"] = {"init_from": self.config.model.init_from, "fingerprint": self._base}
            items["run"] = ocp.args.JsonSave(run)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def saved_run(self, step: int) -> dict:
        """The config, process count and device count recorded with `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run

    def check_base(self, step: int, init_from: str) -> None:
        """A LoRA checkpoint's adapters belong to one base: an error unless `init_from`
        holds the weights `step` was trained on (by fingerprint; it may have moved)."""
        saved = self.saved_run(step).get("base")
        if saved is None:
            raise ConfigError(f"{self.manager.directory}/{step}: records no LoRA base; was it saved by a run "
                              "without LoRA (config.lora.rank = 0)?")
        if base_fingerprint(init_from) != saved["fingerprint"]:
            raise ConfigError(
                f"config.model.init_from = {init_from!r}: its weights are not the base the LoRA adapters in "
                f"{self.manager.directory}/{step} were trained on (they were trained on {saved['init_from']!r}; the "
                "fingerprints of config.json and the safetensors differ). Adapters only mean something on their "
                "own base: point config.model.init_from at it (--config.model.init_from=...)")

    def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None, data_iterator=None) -> None:
        """Restore in place; `model` and `optimizer` give the target shapes and shardings
        (with LoRA, of the adapters: the rest of the model is left as it is). Without an
        optimizer or a data iterator (evaluation, export), the optimizer state and the
        data position are left unread: the moments, twice the parameters' size, are
        never held, and a damaged optimizer state does not stop an export."""
        model_state = nnx.state(model, trainable(model.config))
        target = {"model": nnx.to_pure_dict(model_state)}
        if optimizer is None:
            items = {"state": ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                                     partial_restore=True)}
        else:
            optimizer_state = nnx.state(optimizer)
            target["optimizer"] = nnx.to_pure_dict(optimizer_state)
            items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = StreamsRestore(data_iterator)
        self._check_shapes(step, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax wraps TensorStore's read errors in a bare Exception
            causes = _causes(e)
            damage = next((c for c in causes if isinstance(c, (ValueError, KeyError, OSError))), None)
            if damage is None:
                raise
            if "do not match" not in str(damage):
                raise self._unreadable(step, damage) from e
            raise self._does_not_fit(step) from None
        nnx.replace_by_pure_dict(model_state, restored.state["model"])
        nnx.update(model, model_state)
        if optimizer is not None:
            nnx.replace_by_pure_dict(optimizer_state, restored.state["optimizer"])
            nnx.update(optimizer, optimizer_state)

    def _check_shapes(self, step: int, target: dict) -> None:
        """The config's parameter shapes against the checkpoint's, before reading it: a
        changed layer size is named, not mistaken for a damaged file. Metadata that
        cannot be read is left to the restore, which says so."""
        try:
            stored = ocp.StandardCheckpointHandler().metadata(Path(self.manager.directory) / str(step) / "state")
            stored = _shapes(stored["model"])
        except Exception:  # noqa: BLE001 - any damage is reported by the restore itself
            return
        for name, shape in _shapes(target["model"]).items():
            if name in stored and stored[name] != shape:
                raise self._does_not_fit(step, f"parameter {name}: {stored[name]} in the checkpoint, {shape} for "
                                                "this config")

    def _does_not_fit(self, step: int, detail: str = "") -> ConfigError:
        return ConfigError(
            f"{self.manager.directory}/{step}: the checkpoint's parameters or optimizer state do not fit this config"
            + (f" ({detail})" if detail else "") + "; were config.model or config.optimizer changed in a way that "
            "alters the state, e.g. layer sizes or turning grad_clip on/off? Resume with the config saved in the "
            "workdir's config.json, or start a new workdir")

    def _unreadable(self, step: int, error: Exception) -> ConfigError:
        """A damaged checkpoint (a truncated file, a folder left empty): named, with the
        way back to an older one. Nothing is deleted: which one to give up is the user's call."""
        others = [s for s in self.manager.all_steps() if s != step]
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        way_back = (f"the checkpoints before it: steps {', '.join(map(str, sorted(others)))}; move "
                    f"{self.manager.directory}/{step} out of the checkpoints folder to resume from step "
                    f"{max(others)}, or give eval/export --step {max(others)}") if others else "no other checkpoint is saved"
        return ConfigError(f"{self.manager.directory}/{step}: the checkpoint cannot be read ({reason}); it is "
                           f"left as it is; {way_back}")

    def stream_count(self, step: int) -> int | None:
        """How many data streams the run that saved `step` had."""
        return saved_stream_count(Path(self.manager.directory) / str(step) / "data")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
