"""`jit-tune <verb>`: parses arguments and dispatches; the work lives in the library.

    jit-tune train --config configs/tiny.py --workdir runs/tiny --config.optimizer.lr=3e-4
    jit-tune train --workdir runs/tiny          (resume with the config the run saved)
    jit-tune eval  --workdir runs/tiny [--step N]
    jit-tune data inspect --config configs/t0.py
    jit-tune export --workdir runs/tiny --out runs/tiny/hf [--step N] [--dtype bfloat16]
    jit-tune export --workdir runs/lora --out runs/lora/adapter [--merged]   (LoRA: a PEFT adapter, or merged)
    jit-tune convert --gguf model.gguf --out models/hf     (needs jit_tune[gguf]; then --config.model.init_from=...)
    jit-tune generate --workdir runs/tiny --prompt "Sort these words: owl cake"     (or --hf DIR)
    jit-tune compile --config configs/llama3_8b.py --topology v5p:4x4x8    (AOT; needs jit_tune[tpu])
    jit-tune sweep all --sweep configs/sweep_tiny.py --dir runs/sweep      (or plan, run, collect, fit, ...)

User mistakes (a bad config, a missing file, bad data) end with a one-paragraph message
and exit code 2, never a traceback; a run whose loss or state stops being finite ends
with exit code 3; SIGTERM ends with exit code 75 (training saves a checkpoint first;
rerun to resume; see train/preemption.py for every phase); running out of device or
host memory, and `compile` finding that the step does not fit the chip's memory, end
with exit code 4 and the settings that would use less; the file system refusing a write
(a full disk, a read-only or forbidden directory) ends with exit code 5.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import os
import re
import sys
from pathlib import Path

OVERRIDES_HELP = ("Any config field can be set after the flags: --config.section.field=value, e.g. "
                  "--config.optimizer.lr=3e-4 --config.data.mixture.sort=2.0 (a misspelt field is an error naming "
                  "the closest one).")
# What uses less memory, by verb: said when a command runs out of it.
EVAL_MEMORY = "evaluation needs less with a smaller eval.batch_size (rows scored and prompts decoded per call)"
OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|out of memory", re.IGNORECASE)  # XLA's words on CPU, GPU, TPU
# The file system refusing a read or write, as errno says it, also inside other libraries'
# errors (TensorStore's, under Orbax's checkpoint writes).
FILE_SYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
FILE_SYSTEM = re.compile("|".join(re.escape(os.strerror(code)) for code in FILE_SYSTEM_ERRNOS))
EXIT_FILE_SYSTEM = 5
LESS_MEMORY = {
    "train": ("a training step needs less with a smaller data.batch_size or data.seq_len, more train.microbatches, "
              "or model.remat='full' (`jit-tune compile` shows a step's memory before a launch); " + EVAL_MEMORY
              + ". Checkpoints already saved are kept"),
    "eval": EVAL_MEMORY,
    "generate": "a shorter prompt or a smaller --max-new-tokens needs less",
}
SAVED_OVERRIDES_HELP = ("Fields of the run's saved config can be changed after the flags: "
                        "--config.section.field=value, e.g. --config.eval.examples_per_task=500.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jit-tune", description="FLAN-style instruction tuning in JAX.",
                                     epilog=OVERRIDES_HELP)
    parser.add_argument("--version", action="version", version=f"jit-tune {importlib.metadata.version('jit_tune')}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, epilog: str = OVERRIDES_HELP) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help, description=help, epilog=epilog)

    train = verb("train", "train (or resume) a run; then evaluate it")
    train.add_argument("--config", help="config file, optionally path.py:variant; without it, a workdir's run "
                                        "resumes with the config it saved")
    train.add_argument("--workdir", required=True, help="run directory; running again resumes from it")
    evaluate = verb("eval", "evaluate a checkpoint of a workdir (the latest by default), or a Hugging Face model "
                            "before tuning (--hf DIR --config X: the baseline on X's eval tasks)", SAVED_OVERRIDES_HELP)
    model_source = evaluate.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--workdir", help="a jit-tune workdir: evaluated on its saved config's eval tasks")
    model_source.add_argument("--hf", help="a Hugging Face model dir, evaluated as it is on --config's eval tasks")
    evaluate.add_argument("--config", help="with --hf: the config whose eval tasks and metrics to use")
    evaluate.add_argument("--out", help="with --hf: a directory for the results and predictions")
    evaluate.add_argument("--step", type=int, help="the checkpoint to evaluate (default: the latest)")
    for command in (train, evaluate):  # multi-process runs; see jit_tune/distributed.py
        command.add_argument("--coordinator", help="HOST:PORT of process 0, where no cluster manager tells JAX")
        command.add_argument("--num-processes", type=int)
        command.add_argument("--process-id", type=int)
    export = verb("export", "write a checkpoint of a workdir as a Hugging Face model dir; of a LoRA run, as a PEFT "
                            "adapter dir for its base (or with --merged, the whole model)", SAVED_OVERRIDES_HELP)
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="a new directory, or an earlier export to replace")
    export.add_argument("--step", type=int, help="the checkpoint to export (default: the latest)")
    export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the weights")
    export.add_argument("--merged", action="store_true", help="a LoRA run: the base with the adapters merged in "
                        "float32 (a quantized base dequantized), as a Hugging Face model dir, instead of the adapter")
    convert = verb("convert", "convert a GGUF file (llama.cpp's format; its weights dequantized) into a Hugging Face "
                              "model dir, with the file's tokenizer and chat template, which "
                              "--config.model.init_from, eval --hf and generate --hf read (init_from also takes the "
                              ".gguf file itself and converts it once into a cache); needs pip install "
                              "'jit_tune[gguf]'", epilog=None)
    convert.add_argument("--gguf", required=True, help="the .gguf file")
    convert.add_argument("--out", required=True, help="a new directory, or an earlier conversion to replace")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the weights")
    aot = verb("compile", "AOT-compile the train step for a TPU topology; report memory and FLOPs")
    aot.add_argument("--config", required=True)
    aot.add_argument("--topology", required=True, help="GENERATION:GRID, e.g. v5p:4x4x8 or v6e:16x16")
    aot.add_argument("--slices", type=int, default=1, help="slices over DCN (set config.mesh.dcn_shape to match)")
    data = verb("data", "look at the data a config trains on")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    inspect = data_verbs.add_parser("inspect", help="rendered examples, mixture, lengths, packing; no model",
                                    epilog=OVERRIDES_HELP)
    inspect.add_argument("--config", required=True)
    inspect.add_argument("--examples", type=int, default=3, help="rendered examples to show")
    inspect.add_argument("--sample", type=int, default=2000, help="examples sampled for the statistics")
    sweep = verb("sweep", "sweep task-mixture ratios: plan, run, collect, fit, propose, confirm, report (or all)")
    sweep_verbs = sweep.add_subparsers(dest="sweep_verb", required=True)
    for name, help in (("plan", "write the manifest of runs (deterministic from the sweep's seed) and print it"),
                       ("run", "run the pending runs here (on clusters: python launch/<engine>.py --sweep DIR)"),
                       ("collect", "one table of every run: results.csv and results.parquet"),
                       ("fit", "surrogates of the target, with out-of-fold trust figures"),
                       ("propose", "the mixture the chosen surrogate predicts is best"),
                       ("confirm", "train the proposal and the baselines with the same seeds; predicted vs actual"),
                       ("report", "report.html and report.md with the plots"),
                       ("all", "plan, run, fit, propose, confirm and report, in order"),
                       ("worker", "(internal) one of run's processes")):
        command = sweep_verbs.add_parser(name, help=help, description=help, epilog=OVERRIDES_HELP
                                         if name in ("plan", "all") else None)
        command.add_argument("--dir", required=True, help="the sweep directory")
        if name in ("plan", "all"):
            command.add_argument("--sweep", required=True, help="sweep config file, path.py[:variant]")
        if name in ("run", "confirm", "all"):
            command.add_argument("--processes", type=int, default=1, help="runs at once on this machine")
            command.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
        if name in ("run", "worker"):
            command.add_argument("--kind", choices=("proxy", "confirm"), help="only these runs")
        if name == "worker":
            command.add_argument("--shard", type=int, required=True)
            command.add_argument("--shards", type=int, required=True)
    gen = verb("generate", "reply to a prompt through the chat template", SAVED_OVERRIDES_HELP + " (--workdir only)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a jit-tune workdir (its latest checkpoint)")
    source.add_argument("--hf", help="a Hugging Face model dir")
    gen.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = _parser().parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        _parser().error(f"unrecognized arguments: {' '.join(unknown)}")

    # Signals first: a SIGTERM at any moment from here on ends in a defined way.
    from jit_tune.train.preemption import EXIT_INTERRUPTED, SIGNALS, Preempted

    SIGNALS.install()
    SIGNALS.exit_at_once = True
    sys.unraisablehook = _quiet_closed_event_loops(sys.unraisablehook)
    logging.getLogger("absl").addFilter(_quiet_file_system_refusals)
    SIGNALS.phase = "startup" if args.verb == "train" else "command"
    from jit_tune.distributed import choose_platform

    choose_platform()
    import jax
    # jit_tune uses transformers for tokenizers only; its "PyTorch was not found" advice
    # would mislead. Imported here so that `--help` answers without loading JAX.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from jit_tune.config import ConfigError
    from jit_tune.data.mixture import MixtureError
    from jit_tune.data.sources import SourceError
    from jit_tune.distributed import DistributedError
    from jit_tune.topology import TopologyError

    try:
        return _dispatch(args, overrides)
    except (ConfigError, FileNotFoundError, SourceError, MixtureError, DistributedError, TopologyError) as e:
        print(f"jit-tune {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError) as e:  # a file where a directory (--workdir, --dir) goes
        print(f"jit-tune {args.verb}: error: {e.filename}: {e.strerror}: expected a directory there (or none, to "
              "create)", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverged run: the last good checkpoint stays
        print(f"jit-tune {args.verb}: error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"jit-tune {args.verb}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"jit-tune {args.verb}: interrupted (Ctrl-C); files are written atomically, so none is left "
              "half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        refusal = _file_system_refusal(e)
        if refusal is not None:
            again = "run the same command to resume" if args.verb == "train" else "run the command again"
            print(f"jit-tune {args.verb}: error: the file system refused: {refusal}\nWhat was saved before is kept "
                  f"(a checkpoint or file cut short never replaces one); free space or fix the permissions, then "
                  f"{again}.", file=sys.stderr)
            return EXIT_FILE_SYSTEM
        if not (isinstance(e, jax.errors.JaxRuntimeError) and OUT_OF_MEMORY.search(str(e))):
            raise
        advice = LESS_MEMORY.get(args.verb)
        print(f"jit-tune {args.verb}: error: out of memory on {jax.devices()[0].platform.upper()}: "
              f"{str(e).strip().splitlines()[0]}" + (f"\n{advice[0].upper()}{advice[1:]}." if advice else ""),
              file=sys.stderr)
        return 4


def _quiet_closed_event_loops(hook):
    """When a checkpoint read fails (a damaged file, a shape that does not fit), Orbax's
    other reads, still in flight in TensorStore's threads, call back into its closed event
    loop; each prints a traceback that buries the one-paragraph error. Those are dropped."""

    def quiet(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            hook(unraisable)

    return quiet


def _quiet_file_system_refusals(record: logging.LogRecord) -> bool:
    """On a full disk Orbax logs its failed background write at ERROR with a traceback,
    once for each thread that waited on it (four, 320 lines), above jit-tune's own
    paragraph, which names the file and exits 5. Those records are dropped (a logging
    filter); Orbax's other errors keep theirs."""
    error = record.exc_info[1] if record.exc_info else None
    return error is None or _file_system_refusal(error) is None


def _file_system_refusal(error: BaseException) -> str | None:
    """The line naming a full disk, a read-only or forbidden path, in `error` or in the
    errors that led to it (a failed write often surfaces as a later error: a tracker
    closing, a checkpoint waited on); one naming the path if any does."""
    seen, bare = set(), None
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FILE_SYSTEM_ERRNOS:
            if error.filename:
                return f"{error.strerror}: {error.filename}"
            bare = bare or error.strerror
        else:
            line = next((line for line in str(error).splitlines() if FILE_SYSTEM.search(line)), None)
            if line is not None:
                return line.strip()
        error = error.__cause__ or error.__context__
    return bare


def _dispatch(args: argparse.Namespace, overrides: list[str]) -> int:
    from jit_tune.train.preemption import SIGNALS

    if args.verb in ("train", "eval"):
        from jit_tune.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
        SIGNALS.install()  # again: jax.distributed replaces the SIGTERM handler
    if args.verb == "train":
        from jit_tune.api import saved_config
        from jit_tune.config import load_config
        from jit_tune.train.loop import train

        config = load_config(args.config, overrides) if args.config else saved_config(args.workdir, overrides)
        train(config, args.workdir)
    elif args.verb == "eval" and args.hf:
        from jit_tune.api import evaluate_hf
        from jit_tune.config import ConfigError, load_config

        if not args.config:
            raise ConfigError("eval --hf: give --config, whose eval tasks and metrics the model is evaluated on")
        evaluate_hf(args.hf, load_config(args.config, overrides), args.out)
    elif args.verb == "eval":
        from jit_tune.api import evaluate_workdir

        evaluate_workdir(Path(args.workdir), overrides, args.step)
    elif args.verb == "data":
        from jit_tune.config import load_config
        from jit_tune.data.inspect import inspect_data
        from jit_tune.data.pipeline import run_tokenizer
        from jit_tune.data.registry import build_registry

        config = load_config(args.config, overrides)
        registry = build_registry(config)
        inspect_data(config, run_tokenizer(config, registry), registry, args.examples, args.sample)
    elif args.verb == "compile":
        from jit_tune.aot import DoesNotFit, compile_train_step
        from jit_tune.config import load_config
        from jit_tune.topology import parse

        topology = parse(args.topology, args.slices)  # a bad name fails before the config loads
        try:
            # Shapes are enough: a LoRA config needs no base weights (init_from) to be planned.
            report = compile_train_step(load_config(args.config, overrides, need_weights=False), topology)
        except DoesNotFit as e:
            print(f"jit-tune compile: DOES NOT FIT: {e}", file=sys.stderr)
            return 4
        print(report.table())
        if report.peak_bytes > topology.generation.hbm_bytes:
            return 4
    elif args.verb == "export":
        from jit_tune.api import export_workdir

        out = export_workdir(args.workdir, args.out, args.step, args.dtype, overrides, args.merged)
        print(f"wrote {out}")
        if (out / "adapter_config.json").is_file():
            print(f"a PEFT LoRA adapter for its base model: peft.PeftModel.from_pretrained(base, {str(out)!r}), or "
                  f"vllm serve BASE --enable-lora --lora-modules NAME={out}; the whole model with the adapters "
                  f"merged: jit-tune export --workdir {args.workdir} --out DIR --merged")
    elif args.verb == "convert":
        from jit_tune.config import ConfigError
        from jit_tune.models.gguf import convert_gguf

        if overrides:
            raise ConfigError(f"convert takes no config overrides: {' '.join(overrides)}")
        print(f"wrote {convert_gguf(Path(args.gguf), Path(args.out), args.dtype)}")
    elif args.verb == "sweep":
        return _sweep(args, overrides)
    elif args.verb == "generate":
        from jit_tune import api

        api.check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before loading a model
        if args.workdir:
            _, tokenizer, model, _, _ = api.load_workdir(args.workdir, overrides)
        else:
            model, tokenizer = api.load_hf(args.hf)
        replies = api.generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                    args.top_k, args.top_p, args.seed, args.stop)
        for prompt, reply in zip(args.prompt, replies):
            print(f"> {prompt}\n{reply}")
    return 0


def _sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from jit_tune.sweep import verbs
    from jit_tune.sweep.config import load_sweep
    from jit_tune.sweep.runner import run_shard

    directory, verb = Path(args.dir), args.sweep_verb
    if verb in ("plan", "all"):
        verbs.plan(load_sweep(args.sweep, overrides), args.sweep, directory)
    if verb == "worker":
        return run_shard(directory, args.shard, args.shards, args.kind)
    if verb in ("run", "all"):
        code = verbs.run(directory, args.processes, getattr(args, "kind", None) or ("proxy" if verb == "all" else None),
                         args.dry_run)
        if code or args.dry_run:
            return code
    if verb == "collect":
        verbs.collect_table(directory)
    if verb in ("fit", "all"):
        verbs.fit(directory)
    if verb in ("propose", "all"):
        verbs.propose_mixture(directory)
    if verb in ("confirm", "all"):
        code = verbs.confirm(directory, args.processes, args.dry_run)
        if code:
            return code
    if verb in ("report", "all"):
        verbs.report(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
