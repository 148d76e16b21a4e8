"""The config schema, loading, command-line overrides and validation.

Config files are Python (`get_config(arg)` returning a ConfigDict, the ml-collections
convention). They start from `default_config()`, which is locked: setting a key that
does not exist is an error naming the closest valid key, whether the typo is in a file
or on the command line. `validate` checks every value once, before any device work, and
names the file and line (or the command-line flag) that set a bad one.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import math
import re
from pathlib import Path

import ml_collections

from jit_tune.data import builtin_tasks


class ConfigError(ValueError):
    pass


# models/attention.py's CHOICES, spelled out here so loading a config imports no JAX
# (tests/test_attention.py checks that the two agree).
ATTENTION_CHOICES = ("auto", "xla", "xla_tiled", "xla_chunked", "splash", "pallas_gpu")
ATTENTION_TILES = ("q", "kv", "q_dkv", "kv_dkv", "q_dq", "kv_dq")  # the fields of its Blocks
WANDB_MISSING = "wandb is not installed: pip install 'jit_tune[wandb]'"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # everything random derives from this and the step

    c.model = ml_collections.ConfigDict()
    # A Hugging Face model dir to start from: its config.json sets the architecture
    # fields below, its safetensors the weights, its tokenizer the tokenizer.
    c.model.init_from = ""
    c.model.family = "llama"  # the HF model_type written on export
    c.model.vocab_size = 512  # must cover the tokenizer; checked once it is loaded
    c.model.d_model = 192
    c.model.n_layers = 4
    c.model.n_heads = 6
    c.model.n_kv_heads = 3
    c.model.head_dim = 32
    c.model.mlp_dim = 512
    c.model.rope_theta = 10_000.0
    c.model.rope_scaling = "default"  # or "llama3" (with the four fields below)
    c.model.rope_factor = 1.0
    c.model.rope_low_freq_factor = 1.0
    c.model.rope_high_freq_factor = 4.0
    c.model.rope_original_max_position = 8192
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False
    c.model.qkv_bias = False
    c.model.qk_norm = False
    # Gemma switches (see models/decoder.py); filled from config.json on init_from.
    c.model.norm_offset = 0.0
    c.model.embed_scale = False
    c.model.post_norms = False
    c.model.mlp_activation = "silu"
    c.model.attn_softcap = 0.0
    c.model.final_softcap = 0.0
    c.model.query_pre_attn_scalar = 0.0
    c.model.sliding_window = 0
    c.model.layer_types = ()
    c.model.rope_local_theta = 0.0
    # The context length servers size their KV cache by (HF max_position_embeddings); it
    # does not change the forward pass. Filled from config.json on init_from; 0: data.seq_len.
    c.model.max_position_embeddings = 0
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
    # Stored parameter dtype, also what a HF checkpoint is converted to on import
    # (float32: master weights, whatever the checkpoint's dtype).
    c.model.param_dtype = "float32"
    # Activation memory: "none" keeps every activation for the backward pass; "full"
    # recomputes each block from its input; "dots" keeps only matmul outputs.
    c.model.remat = "none"
    # Scan one stacked block over the layers (compile time independent of depth); needs
    # identical layers, and HF import/export read and write unstacked layers only.
    c.model.scan_layers = False
    # Attention implementation (models/attention.py): "auto" (TPU: splash; GPU: pallas_gpu,
    # or xla_chunked with sliding windows or soft-caps; CPU: xla_tiled), xla (the whole
    # score matrix), xla_tiled (query tiles skipping the masked triangle), xla_chunked
    # (flash-style in pure JAX), splash or pallas_gpu (Pallas kernels).
    c.model.attention = "auto"
    # The Pallas kernels' tile sizes (splash, pallas_gpu; models/attention.py's Blocks):
    # queries and keys per tile of the forward pass (q, kv), the dK/dV pass (q_dkv, kv_dkv)
    # and the dQ pass (q_dq, kv_dq). Each 0 (the kernel's default) or a power of two from
    # 16; splash takes multiples of 128, and pallas_gpu needs q_dq = kv_dkv.
    c.model.attention_blocks = ml_collections.ConfigDict({tile: 0 for tile in ATTENTION_TILES})

    c.data = ml_collections.ConfigDict()
    # "builtin" (a BPE trained on the built-in tasks), "bpe" (a BPE trained on the
    # mixture's training text), or a Hugging Face tokenizer dir.
    c.data.tokenizer = "builtin"
    c.data.chat_template = ""  # "": the tokenizer's own; or plain, alpaca, chatml, llama3
    c.data.tokenizer_vocab_size = 512
    c.data.tokenizer_corpus_examples = 2000  # per task, for tokenizer = "bpe"
    c.data.builtin_seed = 0  # the built-in suite's examples are a function of this seed
    # Tasks read from files (besides the built-in suite), by name:
    #   tasks.<name> = {path, kind (auto|jsonl|parquet|hf_disk|hf), format, fields, split, data_files,
    #                   templates (for format "templated": FLAN-style templates, see data/templates.py)}
    #   task_dirs.<prefix> = {path, format}: every <path>/<task>/ is a task "<prefix>/<task>", each file a template
    c.data.tasks = ml_collections.ConfigDict()
    c.data.task_dirs = ml_collections.ConfigDict()
    c.data.on_bad_record = "error"  # or "skip": count bad records, log the first reasons, go on
    c.data.validation_share = 0.02  # of each file task's records, held out by a hash of (task, index)
    # Groups for nested mixtures: groups.<name> = {tasks: (names...), rule: equal|examples|temperature,
    # cap: int (0: none), temperature: float}. See data/mixture.py.
    c.data.groups = ml_collections.ConfigDict()
    # Mixture rates by task or group name: a share of training examples is rate / sum.
    c.data.mixture = ml_collections.ConfigDict({task.name: 1.0 for task in builtin_tasks.TASKS})
    # Mixed examples are shuffled within windows of this many, to vary the task order in
    # rows. A task at rate r gets about r * window consecutive draws of its own (epoch-wise
    # shuffled) stream per window, so keep that well below its size: windows that span
    # epochs repeat records early.
    c.data.shuffle_window = 1024
    c.data.train_on = "all_assistant"  # all_assistant, last_assistant or all
    c.data.seq_len = 128  # packed row length
    c.data.truncation = "left"  # longer examples: "left" cuts the prompt's start, "drop" skips them
    c.data.batch_size = 32  # rows per global batch
    # Data streams, each packed on its own, that processes share (data/streams.py); the
    # batches do not depend on the process count. 0: one per process at the first run.
    c.data.streams = 0
    c.data.workers = 0  # Grain worker processes that render and pack (0: in the training process)
    c.data.packing = "best_fit"  # or "first_fit" (Grain's packers)
    c.data.packing_bins = 256  # rows kept open; more fill better and cost memory

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.end_lr_ratio = 0.1  # cosine decays to lr * end_lr_ratio
    c.optimizer.weight_decay = 0.1  # AdamW's, on weight matrices; never on norm scales or biases
    c.optimizer.decay_embeddings = True  # also on the embedding and output matrices
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.grad_clip = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.microbatches = 1  # gradient accumulation: each batch runs in this many sequential slices
    c.train.keep_checkpoints = 2  # the last N
    c.train.keep_every = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    # A non-finite loss "stop"s the run (exit 3, the last good checkpoint kept), or "skip"s
    # the step's update, up to max_skipped_steps in a row before stopping.
    c.train.on_nonfinite = "stop"
    c.train.max_skipped_steps = 5
    # The training loss and evaluation's scoring compute float32 logits this many positions
    # of each row at a time, so [batch, seq_len, vocab] logits never exist (0: all at once).
    # On a CPU, fewer positions where a chunk would pass 512 rows, to stay in its caches.
    c.train.loss_chunk = 1024

    c.logging = ml_collections.ConfigDict()
    c.logging.group = ""  # a group id runs share (a sweep's name): in every metrics.jsonl line and trackers
    # Weights & Biases (pip install 'jit_tune[wandb]'), from process 0, beside metrics.jsonl and
    # TensorBoard: project "" is off. mode: online, offline (files under $WANDB_DIR or the
    # workdir, for `wandb sync`) or disabled. A resumed run continues the same W&B run.
    c.logging.wandb = ml_collections.ConfigDict({"project": "", "entity": "", "run_name": "", "mode": "online"})

    c.mesh = ml_collections.ConfigDict()
    # Sizes of the named mesh axes; one may be -1, filled with the remaining devices.
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Multi-slice: how many slices each axis spans, over the data-center network (DCN).
    # An axis's full size is shape x dcn_shape; the product of dcn_shape is the slice count.
    c.mesh.dcn_shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    # Logical parameter/activation axis -> mesh axis (or None: replicated).
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("norm", None),
        ("layers", None),  # the stacked axis of model.scan_layers
        ("lora_rank", None),  # LoRA adapters' rank axis: small, never sharded
    )

    c.lora = ml_collections.ConfigDict()
    # LoRA (models/lora.py): rank 0 trains every parameter; rank r > 0 freezes them and trains
    # adapters A [in, r], B [r, out] on the targeted weights, adding (alpha / r) x A B
    # (adapters in float32 whatever model.param_dtype, which the frozen base keeps).
    # Needs model.init_from: adapters adapt pretrained weights. Checkpoints then hold only the
    # adapters and a fingerprint of the base; export writes a PEFT adapter (or --merged).
    c.lora.rank = 0
    c.lora.alpha = 16.0  # PEFT's lora_alpha
    c.lora.dropout = 0.0  # on the adapters' inputs, in training (not on embedding adapters)
    # A regular expression fully matching the stems of the weights adapted: q, k, v, o
    # (attention), gate, up, down (MLP), embed, unembed (embeddings; untied only).
    c.lora.targets = "q|k|v|o|gate|up|down"
    # QLoRA: the frozen attention and MLP weights stored as "int8" (per output channel) or
    # "nf4" (4-bit NormalFloat in blocks of 64), dequantized to model.dtype at use.
    c.lora.base_quantization = "none"

    c.eval = ml_collections.ConfigDict()
    # What is evaluated (eval/evaluator.py): task names, or group or cluster names standing
    # for their tasks, trained or not; (): the mixture's tasks and every cluster's tasks.
    c.eval.tasks = ()
    # Clusters for aggregation: clusters.<name> = {tasks: (names...), held_out: bool}. A
    # held-out cluster's tasks must not be trained on (FLAN/T0's held-out evaluation).
    c.eval.clusters = ml_collections.ConfigDict()
    # Metrics by task, group or cluster name, overriding the default rule (eval/evaluator.py):
    # metrics.<name> = {metrics: (exact_match|token_f1|rouge_l|acc|acc_norm|acc_token_mean, ...),
    # normalize: (case, whitespace, punctuation, articles)}. The first metric is the task's score.
    c.eval.metrics = ml_collections.ConfigDict()
    c.eval.max_options = 10  # a template whose answers take at most this many values is scored by its options
    c.eval.shots = 0  # exemplars from the task's train split before each prompt (FLAN's few-shot)
    c.eval.every_steps = 0  # 0: only at the end of training
    c.eval.at_start = False  # also evaluate before the first step (step 0: the baseline of the run)
    c.eval.examples_per_task = 100  # per task and per template group (held-in, held-out)
    # Rows of data.seq_len per scoring pass, and prompts per generate call. 0: a training
    # microbatch's rows (data.batch_size // train.microbatches), which fit wherever training does.
    c.eval.batch_size = 0
    c.eval.max_new_tokens = 24
    c.eval.predictions = True  # eval/predictions/step_<N>/<task>.jsonl: prompt, target, prediction, options

    c.lock()
    # Named collections a config file adds entries to (`c.data.tasks.reviews = dict(...)`).
    for collection in (c.data.tasks, c.data.task_dirs, c.data.groups, c.eval.clusters, c.eval.metrics):
        collection.unlock()
    return c


# Fields whose value is a whole collection of names: a saved config's value replaces the
# default's instead of merging into it (a run trained on three tasks reloads with three).
COLLECTIONS = ("data.mixture", "data.tasks", "data.task_dirs", "data.groups", "eval.clusters", "eval.metrics")


def smoke(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """The few-step CPU variant every config file offers (`path.py:smoke`): a 2-layer,
    d=64 model, so a test runs the config's whole path in seconds."""
    m = config.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim = 64, 2, 4, 2, 16, 128
    config.train.steps = steps
    config.train.log_every = 2
    config.train.checkpoint_every = steps // 2
    config.optimizer.warmup_steps = steps // 3
    config.eval.examples_per_task = 2
    config.eval.max_new_tokens = 4
    return config


# ---------------------------------------------------------------------------- loading


def load_config(spec: str, overrides: list[str] = (), validator=None,
                need_weights: bool = True) -> ml_collections.ConfigDict:
    """Load `path[:variant]`, apply `--config.a.b=value` overrides, validate, and lock.

    A config file lists the variants its get_config(arg) accepts in `VARIANTS`; any
    other is an error listing them. `validator` checks the result (default: a run
    config's `validate`; sweep configs bring their own). `need_weights`: see `validate`.
    """
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--config: no config file at {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"jit_tune_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path}: defines no get_config()")
        variants = getattr(module, "VARIANTS", None)
        if arg and variants is not None and arg not in variants:
            close = difflib.get_close_matches(arg, variants, n=1)
            raise ConfigError(f"{spec}: {path} has no variant {arg!r}" + (f"; did you mean {path}:{close[0]}?" if close
                              else "") + f" Its variants: {', '.join(variants) or 'none'} (or no variant: {path})")
        takes_arg = len(inspect.signature(module.get_config).parameters) > 0
        if arg and not takes_arg:
            raise ConfigError(f"{spec}: {path}'s get_config() takes no variant; use {path}")
        config = module.get_config(arg or None) if takes_arg else module.get_config()
    except AttributeError as e:  # a typo'd key in the file, on the locked defaults
        raise ConfigError(f"{path}{_line_of_error(e, path)}: {_readable(e)}") from None
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # anything else the file's own code raised, with its line
        raise ConfigError(f"{path}{_line_of_error(e, path)}: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
    config.lock()
    sources = {}
    for item in overrides:
        key = apply_override(config, item)
        sources[key] = f"command line {item}"
    if validator is None:
        if config.model.init_from:
            _take_architecture_from_hf(config, sources.get("model.init_from") or path)
        validate(config, path, sources, need_weights=need_weights)
    else:
        validator(config, path, sources)
    return config


# What a Hugging Face model directory must hold for init_from: (what, any of these files).
_HF_PARTS = (("config.json", ("config.json",)),
             ("weights", ("model.safetensors", "model.safetensors.index.json")),
             ("a tokenizer", ("tokenizer.json", "tokenizer.model", "vocab.json")))


def _take_architecture_from_hf(config: ml_collections.ConfigDict, where: str) -> None:
    """The model section follows the HF checkpoint, and the tokenizer (with its chat
    template) comes from it too: pretrained weights mean nothing under another one.
    A GGUF file is converted here, at config load, once into a cache directory
    (models/gguf.py), which is then read like any HF directory; init_from keeps
    naming the .gguf file."""
    from jit_tune.models.hf import HFConfigError, decoder_fields_from_hf

    init_from = Path(config.model.init_from)
    field = f"{where}: config.model.init_from = {config.model.init_from!r}"
    if init_from.is_file():
        from jit_tune.models.gguf import GGUFError, cached_conversion

        try:
            init_from = cached_conversion(init_from)
        except GGUFError as e:
            raise ConfigError(f"{field}: {e}") from None
    if not init_from.is_dir():
        raise ConfigError(f"{field}: no such directory; expected a Hugging Face model directory or a .gguf file")
    if (init_from / "checkpoints").is_dir() and (init_from / "config.json").is_file() and \
            {"model", "data", "train"} <= set(json.loads((init_from / "config.json").read_text())):
        raise ConfigError(f"{field} is a jit-tune workdir; export it first (jit-tune export --workdir {init_from} "
                          f"--out {init_from}/hf) and start from the export (--config.model.init_from={init_from}/hf)")
    missing = [what for what, names in _HF_PARTS if not any((init_from / name).is_file() for name in names)]
    if missing:
        raise ConfigError(f"{field}: the directory lacks {' and '.join(missing)}; a Hugging Face model directory "
                          "holds config.json, model.safetensors (or an index with shards) and tokenizer files "
                          "(tokenizer.json); save one with save_pretrained() of the model and its tokenizer")
    if config.data.tokenizer == "bpe":
        raise ConfigError(f"{where}: config.data.tokenizer = 'bpe' with config.model.init_from: a pretrained model "
                          "keeps its own tokenizer; remove the tokenizer setting (init_from brings the tokenizer "
                          "and its chat template)")
    hf_config = init_from / "config.json"
    values = json.loads(hf_config.read_text())
    try:
        config.model.update(decoder_fields_from_hf(values, str(hf_config)))
    except HFConfigError as e:
        raise ConfigError(str(e)) from None
    config.model.family = values.get("model_type", config.model.family)
    if config.data.tokenizer == "builtin":  # a GGUF's tokenizer is in its conversion
        config.data.tokenizer = config.model.init_from if Path(config.model.init_from).is_dir() else str(init_from)
        config.data.tokenizer_vocab_size = config.model.vocab_size


def _readable(error: AttributeError) -> str:
    return str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")


def _line_of_error(error: BaseException, path: str) -> str:
    for frame in reversed(inspect.getinnerframes(error.__traceback__)):
        if Path(frame.filename).resolve() == Path(path).resolve():
            return f":{frame.lineno}"
    return ""


def apply_override(config: ml_collections.ConfigDict, item: str) -> str:
    """Apply one `--config.a.b=value`; returns the dotted key it set."""
    match = re.fullmatch(r"--config\.([\w.]+)=(.*)", item, flags=re.S)
    if not match:
        raise ConfigError(f"{item!r}: expected an override of the form --config.section.field=value")
    key, raw = match.groups()
    *parents, leaf = key.split(".")
    node, walked = config, "config"
    for name in parents + [leaf]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {walked}.{close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{item}: {walked} has no field {name!r}{hint}")
        if name != leaf:
            node, walked = node[name], f"{walked}.{name}"
    current = node[leaf]
    value = _parse_like(raw, current, item)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"{item}: expected {_a_type(current)} ({e})") from None
    return key


def _a_type(value) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}.get(
        type(value), f"a {type(value).__name__}")


def _parse_like(raw: str, current, item: str):
    if isinstance(current, str):
        return raw
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{item}: expected true or false, got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{item}: expected {_a_type(current)}, got {raw!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


# ------------------------------------------------------------------------- validation


def validate(config: ml_collections.ConfigDict, path: str = "<config>", sources: dict | None = None,
             check_files: bool = True, need_weights: bool = True) -> None:
    """Check every value; raise one ConfigError listing each problem with where it was set.
    Without `check_files`, paths to data and tokenizers are not looked at (a saved run
    reloads for export or generation even when its training data has moved). Without
    `need_weights` (`jit-tune compile`, which plans from shapes), LoRA needs no init_from."""
    sources = sources or {}
    problems = []
    defaults = default_config()

    def lookup(root, key: str):
        for part in key.split("."):
            root = root[part] if part in root else None
        return root

    def check(key: str, ok: bool, expected: str):
        if not ok:
            value = lookup(config, key)
            is_default = value == lookup(defaults, key)
            flag = sources.get(key) or next((v for k, v in sources.items() if k.startswith(f"{key}.")), None)
            where = flag or f"{path}{' (default)' if is_default else _line_setting(path, key)}"
            shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            problems.append(f"{where}: config.{key} = {shown!r}: expected {expected}")

    # Types first: the checks below compare values, which a None or a string would break.
    for key, expected in mistyped(config, defaults, COLLECTIONS):
        check(key, False, expected)
    for task, rate in config.data.mixture.items():
        check(f"data.mixture.{task}", _finite_number(rate) and rate >= 0, "a finite rate >= 0")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    m, d, o, t, e = config.model, config.data, config.optimizer, config.train, config.eval
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
        check(f"model.{key}", isinstance(m[key], int) and m[key] > 0, "a positive integer")
    check("model.n_heads", m.n_kv_heads > 0 and m.n_heads % max(m.n_kv_heads, 1) == 0,
          f"a multiple of model.n_kv_heads ({m.n_kv_heads}) for grouped-query attention")
    check("model.head_dim", m.head_dim % 2 == 0, "an even number (RoPE rotates pairs)")
    check("model.dtype", m.dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'")
    check("model.scan_layers", not m.scan_layers or len(set(m.layer_types)) <= 1,
          "false when model.layer_types mixes full and sliding layers (scanned layers are identical)")
    check("model.remat", m.remat in ("none", "full", "dots"), "'none', 'full' or 'dots'")
    check("model.attention", m.attention in ATTENTION_CHOICES and not (
          m.attention == "pallas_gpu" and (m.attn_softcap or (m.sliding_window and "sliding" in m.layer_types))),
          f"{', '.join(ATTENTION_CHOICES)} (pallas_gpu: no attn_softcap or sliding layers)")
    check("model.attention_blocks", set(m.attention_blocks) == set(ATTENTION_TILES),
          f"the tiles {', '.join(ATTENTION_TILES)}")
    for name, size in m.attention_blocks.items():
        check(f"model.attention_blocks.{name}", isinstance(size, int) and (size == 0 or (
              size >= (128 if m.attention == "splash" else 16) and size & (size - 1) == 0)),
              "0 (the kernel's default) or a power of two from " + ("128 (splash)" if m.attention == "splash" else "16"))
    q_dq, kv_dkv = m.attention_blocks.get("q_dq", 0), m.attention_blocks.get("kv_dkv", 0)
    check("model.attention_blocks.q_dq", m.attention != "pallas_gpu" or q_dq == kv_dkv,
          f"equal to model.attention_blocks.kv_dkv ({kv_dkv}) for pallas_gpu, whose backward pass computes dQ of "
          "the query block with the index of its key block")
    check("model.param_dtype", m.param_dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'")
    check("model.rope_theta", m.rope_theta > 0, "a positive number")
    check("model.rope_scaling", m.rope_scaling in ("default", "linear", "llama3"), "'default', 'linear' or 'llama3'")
    check("model.mlp_activation", m.mlp_activation in ("silu", "gelu_tanh"), "'silu' or 'gelu_tanh'")
    check("model.layer_types", not m.layer_types or (len(m.layer_types) == m.n_layers
          and set(m.layer_types) <= {"full", "sliding"}), "empty, or 'full'/'sliding' for each of model.n_layers")
    check("data.tokenizer", d.tokenizer in ("builtin", "bpe") or Path(d.tokenizer).is_dir() or not check_files,
          "'builtin', 'bpe' or a directory holding a Hugging Face tokenizer")
    check("model.family", m.family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"),
          "llama, mistral, qwen2, qwen3, gemma2 or gemma3_text")
    check("data.tokenizer_vocab_size", 256 + 8 <= d.tokenizer_vocab_size <= m.vocab_size,
          f"between 264 (bytes + special tokens) and model.vocab_size ({m.vocab_size})")
    check("data.mixture", sum(d.mixture.values()) > 0, "at least one task or group with a rate > 0")
    check("data.validation_share", 0 <= d.validation_share < 1, "a share in [0, 1)")
    check("data.on_bad_record", d.on_bad_record in ("error", "skip"), "'error' or 'skip'")
    if check_files:  # a saved run reloaded for export reads no data (and may predate today's checks)
        problems.extend(_task_spec_problems(config, path))
        problems.extend(_mixture_problems(config, path))
    problems.extend(_template_problems(config, path))
    check("data.train_on", d.train_on in ("all_assistant", "last_assistant", "all"),
          "'all_assistant', 'last_assistant' or 'all'")
    check("data.seq_len", d.seq_len >= 8, "an integer >= 8")
    check("data.truncation", d.truncation in ("left", "drop"), "'left' or 'drop'")
    check("data.chat_template", d.chat_template in ("", "plain", "alpaca", "chatml", "llama3"),
          "'' (the tokenizer's own), 'plain', 'alpaca', 'chatml' or 'llama3'")
    check("data.batch_size", d.batch_size > 0, "a positive integer")
    check("data.shuffle_window", isinstance(d.shuffle_window, int) and d.shuffle_window > 0, "a positive integer")
    check("data.packing_bins", d.packing_bins > 0, "a positive integer")
    check("data.workers", isinstance(d.workers, int) and d.workers >= 0, "an integer >= 0")
    check("data.streams", isinstance(d.streams, int) and d.streams >= 0 and (not d.streams or
          d.batch_size % d.streams == 0), f"0 (one per process) or a divisor of data.batch_size ({d.batch_size})")
    check("data.packing", d.packing in ("best_fit", "first_fit"), "'best_fit' or 'first_fit'")
    check("optimizer.lr", o.lr > 0, "a positive learning rate")
    check("optimizer.warmup_steps", 0 <= o.warmup_steps < t.steps, f"an integer in [0, train.steps={t.steps})")
    check("optimizer.end_lr_ratio", 0 <= o.end_lr_ratio <= 1, "a number in [0, 1]")
    check("optimizer.weight_decay", o.weight_decay >= 0, "a number >= 0")
    check("optimizer.b1", 0 <= o.b1 < 1, "a number in [0, 1)")
    check("optimizer.b2", 0 <= o.b2 < 1, "a number in [0, 1)")
    check("optimizer.grad_clip", o.grad_clip >= 0, "a number >= 0 (0 disables clipping)")
    check("train.keep_every", isinstance(t.keep_every, int) and t.keep_every >= 0, "an integer >= 0 (0: none)")
    check("train.on_nonfinite", t.on_nonfinite in ("stop", "skip"), "'stop' or 'skip'")
    for key in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_skipped_steps", "microbatches"):
        check(f"train.{key}", isinstance(t[key], int) and t[key] > 0, "a positive integer")
    check("train.loss_chunk", isinstance(t.loss_chunk, int) and t.loss_chunk >= 0, "an integer >= 0 (0: unchunked)")
    w = config.logging.wandb
    check("logging.wandb.mode", w.mode in ("online", "offline", "disabled"), "'online', 'offline' or 'disabled'")
    # Not for a saved run reloaded to export or evaluate (check_files off): it logs nothing.
    check("logging.wandb.project", not w.project or not check_files or importlib.util.find_spec("wandb") is not None,
          f"'' (off), since {WANDB_MISSING}")
    sizes = dict(config.mesh.shape)
    check("mesh.shape", set(sizes) == {"data", "fsdp", "tensor"}, "the axes data, fsdp and tensor")
    check("mesh.shape", all(isinstance(s, int) and (s > 0 or s == -1) for s in sizes.values())
          and list(sizes.values()).count(-1) <= 1, "positive sizes, at most one -1 (fill)")
    dcn = dict(config.mesh.dcn_shape)
    check("mesh.dcn_shape", set(dcn) == {"data", "fsdp", "tensor"} and all(
          isinstance(s, int) and s > 0 for s in dcn.values()), "positive sizes for the axes data, fsdp and tensor")
    check("mesh.rules", all(isinstance(r, (tuple, list)) and len(r) == 2 for r in config.mesh.rules),
          "(logical axis, mesh axis or None) pairs")
    check("eval.every_steps", e.every_steps >= 0, "an integer >= 0 (0: only at the end)")
    check("eval.shots", isinstance(e.shots, int) and e.shots >= 0, "an integer >= 0")
    check("eval.max_options", isinstance(e.max_options, int) and e.max_options >= 2, "an integer >= 2")
    for key in ("examples_per_task", "max_new_tokens"):
        check(f"eval.{key}", e[key] > 0, "a positive integer")
    check("eval.batch_size", isinstance(e.batch_size, int) and e.batch_size >= 0,
          "an integer >= 0 (0: the training microbatch's rows)")
    _check_lora(config, check, need_weights)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def mistyped(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, collections=(),
             prefix: str = ""):
    """(key, what was expected) for each field not of its default's type: an integer
    field takes no float or bool, a float field any finite number (not inf, not nan), a
    tuple a list too, and no field None. `collections` (dotted names) hold free-form
    entries, checked by the caller; so are fields missing from a dict a file replaced
    whole (mesh.shape, model.attention_blocks: their own checks name what they lack)."""
    for key, default in defaults.items():
        field, value = f"{prefix}{key}", config.get(key)
        if field in collections or default is None or key not in config:
            continue
        if isinstance(default, ml_collections.ConfigDict):
            if isinstance(value, ml_collections.ConfigDict):
                yield from mistyped(value, default, collections, f"{field}.")
            else:
                yield field, "a dict of fields"
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                yield field, "true or false"
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                yield field, "an integer"
        elif isinstance(default, float):
            if not _finite_number(value):
                yield field, "a finite number"
        elif isinstance(default, str):
            if not isinstance(value, str):
                yield field, "a string"
        elif isinstance(default, tuple) and not isinstance(value, (tuple, list)):
            yield field, "a tuple"


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_lora(config: ml_collections.ConfigDict, check, need_weights: bool) -> None:
    """LoRA's fields, each problem recorded by `validate`'s `check`."""
    from jit_tune.models.lora import QUANTIZATIONS, STEMS, adapted_stems
    from jit_tune.models.quantize import NF4_BLOCK

    lora, m = config.lora, config.model
    check("lora.rank", isinstance(lora.rank, int) and lora.rank >= 0, "an integer >= 0 (0: full fine-tuning)")
    check("lora.alpha", isinstance(lora.alpha, (int, float)) and lora.alpha > 0, "a number > 0 (the update scales "
          "by alpha / rank)")
    check("lora.dropout", isinstance(lora.dropout, (int, float)) and 0 <= lora.dropout < 1, "a rate in [0, 1)")
    try:
        stems = adapted_stems(lora.targets)
    except (re.error, TypeError) as e:
        stems = None
        check("lora.targets", False, f"a regular expression ({e})")
    if stems is not None:
        check("lora.targets", bool(stems), f"a regular expression fully matching some of {', '.join(STEMS)}")
        tied = [s for s in stems if s in ("embed", "unembed")] if m.tie_embeddings else []
        check("lora.targets", not (lora.rank and tied), "no embed or unembed with model.tie_embeddings (one "
              "tensor serves both: a merged export could not express an adapter on one side)")
    check("lora.base_quantization", lora.base_quantization in QUANTIZATIONS, f"one of {', '.join(QUANTIZATIONS)}")
    check("lora.base_quantization", lora.base_quantization == "none" or lora.rank > 0,
          "'none' with lora.rank = 0 (a quantized base is frozen: QLoRA trains adapters, set lora.rank)")
    if lora.base_quantization == "nf4":
        short = {k: m[k] for k in ("d_model", "mlp_dim", "head_dim") if m[k] % NF4_BLOCK}
        check("lora.base_quantization", not short, f"int8 or none for this model: nf4 quantizes blocks of "
              f"{NF4_BLOCK} along each projection's input, and model {short} are not multiples of {NF4_BLOCK}")
    check("lora.rank", not lora.rank or any(rule[0] == "lora_rank" for rule in config.mesh.rules
                                            if isinstance(rule, (tuple, list)) and rule),
          "adapters with a mesh.rules entry for their 'lora_rank' axis (add ('lora_rank', None))")
    check("lora.rank", not lora.rank or not need_weights or bool(m.init_from),
          "0 without config.model.init_from: LoRA adapts pretrained weights, so set model.init_from to a Hugging "
          "Face model directory or .gguf file (only `jit-tune compile` plans without one)")


def _task_spec_problems(config: ml_collections.ConfigDict, path: str) -> list[str]:
    """File tasks' specs: known keys, format and fields, and a path that exists."""
    from jit_tune.data.formats import FILE_TASK_FIELDS, TASK_DIR_FIELDS, task_spec
    from jit_tune.data.sources import SourceError

    problems = []
    for collection, defaults in (("tasks", FILE_TASK_FIELDS), ("task_dirs", TASK_DIR_FIELDS)):
        for name, spec in config.data[collection].items():
            where = f"{path}{_line_setting(path, name)}: "
            if not isinstance(spec, ml_collections.ConfigDict):
                problems.append(f"{where}config.data.{collection}.{name} = {spec!r}: expected a dict with a 'path'")
                continue
            try:
                values = task_spec(spec, defaults, f"config.data.{collection}.{name}")
            except SourceError as error:
                problems.append(f"{where}{error}")
                continue
            if not Path(values["path"]).exists():
                problems.append(f"{where}config.data.{collection}.{name}.path = {values['path']!r}: no such file or "
                                "directory")
    return problems


def _mixture_problems(config: ml_collections.ConfigDict, path: str) -> list[str]:
    """Structure of the nested mixture, checked before any file is opened: every name a
    task or a group, rules known (file tasks' sizes are placeholders here)."""
    from jit_tune.data.mixture import MixtureError, task_rates

    d = config.data
    names, problems = set(builtin_tasks.TASKS_BY_NAME), []
    for name in d.tasks:
        if name in names:
            problems.append(f"{path}{_line_setting(path, name)}: config.data.tasks.{name}: a built-in task has this "
                            "name: expected another name")
        names.add(name)
    for prefix, spec in d.task_dirs.items():
        if isinstance(spec, ml_collections.ConfigDict) and "path" in spec and Path(spec.path).is_dir():
            for task in sorted(p.name for p in Path(spec.path).iterdir() if p.is_dir()):
                if f"{prefix}/{task}" in names:
                    problems.append(f"{path}{_line_setting(path, prefix)}: config.data.task_dirs.{prefix}: its task "
                                    f"{prefix}/{task} has the name of a task already defined: expected another prefix")
                names.add(f"{prefix}/{task}")
    if problems:
        return problems
    groups = {}
    for name, group in d.groups.items():
        values = group.to_dict() if isinstance(group, ml_collections.ConfigDict) else {}
        missing = {"tasks", "rule"} - set(values)
        if missing:
            return [f"{path}{_line_setting(path, name)}: config.data.groups.{name}: missing {sorted(missing)}"]
        groups[name] = {"cap": 0, "temperature": 1.0, **values}
    try:
        # Built-in tasks are generated (unbounded); data files' sizes are not read here.
        sizes = {n: math.inf if n in builtin_tasks.TASKS_BY_NAME else 1.0 for n in names}
        trained = set(task_rates(dict(d.mixture), groups, sizes))
    except MixtureError as e:
        named = re.match(r"config\.data\.\w+\.([^\s.:=]+)", str(e))  # the group or mixture entry at fault
        return [f"{path}{_line_setting(path, named.group(1)) if named else ''}: {e}"]
    return _eval_problems(config, path, names, groups, trained)


CLUSTER_FIELDS = {"tasks", "held_out"}
EVAL_METRIC_FIELDS = {"metrics", "normalize"}


def _eval_problems(config: ml_collections.ConfigDict, path: str, names: set[str], groups: dict,
                   trained: set[str]) -> list[str]:
    """Eval tasks, clusters and metric declarations name things that exist, and no task
    of a held-out cluster is trained on."""
    from jit_tune.eval.metrics import METRICS, NORMALIZATIONS

    e, problems = config.eval, []
    where = lambda key: f"{path}{_line_setting(path, key)}: config.eval.{key}"  # noqa: E731
    clusters = {}
    for name, cluster in e.clusters.items():
        values = cluster.to_dict() if isinstance(cluster, ml_collections.ConfigDict) else {}
        if "tasks" not in values or set(values) - CLUSTER_FIELDS:
            problems.append(f"{where('clusters')}.{name} = {values!r}: expected a dict with 'tasks' (names) and "
                            "optionally 'held_out' (bool)")
            continue
        if not _names(values["tasks"]):
            problems.append(f"{where('clusters')}.{name}.tasks = {values['tasks']!r}: expected a non-empty tuple of "
                            "task names")
            continue
        if not isinstance(values.get("held_out", False), bool):
            problems.append(f"{where('clusters')}.{name}.held_out = {values['held_out']!r}: expected True or False")
            continue
        unknown = [t for t in values["tasks"] if t not in names]
        if unknown:
            problems.append(f"{where('clusters')}.{name}.tasks: {unknown} are not tasks; known: "
                            f"{', '.join(sorted(names))}")
        clusters[name] = values
        if values.get("held_out") and trained & set(values["tasks"]):
            problems.append(f"{where('clusters')}.{name} is held out of training, but the mixture trains on "
                            f"{sorted(trained & set(values['tasks']))}: set their rates to 0 or drop held_out")
    known = names | set(groups) | set(clusters)
    unknown = [t for t in e.tasks if t not in known]
    if unknown:
        problems.append(f"{where('tasks')} = {tuple(e.tasks)!r}: {unknown} are not task, group or cluster names")
    for name, spec in e.metrics.items():
        values = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else {}
        if name not in known or not values or set(values) - EVAL_METRIC_FIELDS:
            problems.append(f"{where('metrics')}.{name}: expected a task, group or cluster name with a dict of "
                            "'metrics' and/or 'normalize'")
        elif not all(_names(values[key]) for key in values):
            problems.append(f"{where('metrics')}.{name} = {values!r}: 'metrics' and 'normalize' are tuples of "
                            "names, e.g. ('exact_match',)")
        elif set(values.get("metrics", ())) - set(METRICS) or set(values.get("normalize", ())) - set(NORMALIZATIONS):
            problems.append(f"{where('metrics')}.{name} = {values!r}: metrics are some of {', '.join(METRICS)}; "
                            f"normalize some of {', '.join(NORMALIZATIONS)}")
    return problems


def _names(value) -> bool:
    """A non-empty tuple (or list) of names: not a bare string, whose letters would be read one by one."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _template_problems(config: ml_collections.ConfigDict, path: str) -> list[str]:
    """Templated tasks' templates compile and their knobs are in range, checked before
    any file is opened."""
    from jit_tune.data.sources import SourceError
    from jit_tune.data.templates import TemplateSet

    problems = []
    for name, spec in config.data.tasks.items():
        if isinstance(spec, ml_collections.ConfigDict) and spec.get("templates") is not None:
            templates = spec.templates
            try:
                TemplateSet(templates.to_dict() if isinstance(templates, ml_collections.ConfigDict) else templates,
                            f"config.data.tasks.{name}.templates")
            except SourceError as error:
                problems.append(f"{path}{_line_setting(path, 'templates')}: {error}")
    return problems


def _line_setting(path: str, key: str) -> str:
    """':LINE' of the first line in the config file that assigns `key`'s last part."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return ""
    leaf = re.escape(key.split(".")[-1])
    pattern = re.compile(rf"(\b{leaf}\s*=[^=]|['\"]{leaf}['\"]\s*[:\]])")
    for number, line in enumerate(lines, 1):
        if pattern.search(line):
            return f":{number}"
    return ""


def config_from_dict(values: dict, source: str, check_files: bool = True) -> ml_collections.ConfigDict:
    """The defaults updated with a saved config (config.json, or a checkpoint's), with
    collections (mixture, tasks, groups) taken whole; validated and locked. Fields the
    saved config lacks (it predates them) keep their defaults."""
    config = default_config()
    update_from_saved(config, values, COLLECTIONS, source, "config")
    validate(config, source, check_files=check_files)
    config.lock()
    return config


def update_from_saved(node: ml_collections.ConfigDict, saved: dict, collections, source: str, kind: str,
                      prefix: str = "") -> None:
    """Set `node`'s fields from a saved dict (config.json, a manifest; `source` names
    it, `kind` is "config" or "sweep"): nested sections field by field, so fields the
    saved dict predates keep their defaults; `collections` (dotted names) taken whole;
    lists back to tuples. A field the defaults lack, or a section that is not a JSON
    object, is a ConfigError."""
    for key, value in saved.items():
        field = f"{prefix}{key}"
        if key not in node:
            raise ConfigError(f"{source}: unknown {kind} field {field} (saved by another version of jit_tune?)")
        section = field in collections or isinstance(node[key], ml_collections.ConfigDict)
        if section and not isinstance(value, dict):
            raise ConfigError(f"{source}: {kind}.{field}: expected a section (a JSON object {{...}}), found "
                              f"{json.dumps(value)[:80]}; the file was left as it is")
        if field in collections:
            node[key] = ml_collections.ConfigDict(value)
        elif isinstance(node[key], ml_collections.ConfigDict):
            update_from_saved(node[key], value, collections, source, kind, f"{field}.")
        else:
            node[key] = _as_tuples(value) if isinstance(node[key], tuple) else value


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as JSON-ready values (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=list))


# Sections every config.json has held: a file without them was not written by jit_tune.
SAVED_CONFIG_KEYS = ("model", "data", "train")


def save_config(config: ml_collections.ConfigDict, path: Path) -> None:
    """config.json, written atomically: a kill never leaves half a config."""
    from jit_tune.files import atomic_write_json

    atomic_write_json(path, config_to_dict(config))
