"""The command line: ``leantrain train|compare|plan|eval|export|generate [options]`` (``leantrain COMMAND --help``)."""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from typing import Any

from . import distributed
from .errors import LeantrainError, UserError

USAGE = """usage: leantrain train [--config FILE.toml] [--recipe NAME] [--section.key=value ...]

Train a Llama-style model. Every key below can come from the TOML file ([section] tables) or the
command line (which wins). --recipe sets a named group of precision keys (config.RECIPES):
fp32, bf16-mixed, bf16, bf16-fp32state, bf16-sr, bf16-kahan, bf16-int8, bf16-int4, bf16-int4-int8.
"""


def _wrap(text: str) -> str:
    """A message wrapped at 100 columns between words only: a path, a key=value or a hyphenated word is never cut
    (a reader copies them, and a cut would put a space inside them for anyone who joins the lines again)."""
    return textwrap.fill(text, 100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return "leantrain: warning: " + _wrap(str(message)) + "\n"


def _take_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from args; return (VALUE or None, the rest)."""
    rest, value, i = [], None, 0
    while i < len(args):
        if args[i] == f"--{name}":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UserError(f"--{name} needs a value, e.g. --{name}=VALUE.")
            value, i = args[i + 1], i + 2
            continue
        if args[i].startswith(f"--{name}="):
            value = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return value, rest


def _train(args: list[str], hooks: Any = None) -> int:
    from .config import load_config, parse_overrides
    from .runplan import resolve

    config_path, args = _take_option(args, "config")
    plan = resolve(load_config(config_path, parse_overrides(args)))

    from .guard import stop_on_signals
    from .hooks import Hooks
    from .train import train

    with stop_on_signals():  # SIGTERM/SIGINT: finish the step, save, exit 0; a second one: exit at once
        train(plan, hooks or Hooks())
    return 0


COMPARE_USAGE = """usage: leantrain compare --recipes fp32,bf16,bf16-sr [--out DIR] [--config FILE.toml] [train options ...]

Trains the same model from the same initial weights on the same batches under each recipe (each in
its own process), then writes DIR/<recipe>/ run folders, DIR/summary.json, DIR/report.md (final
losses, eval gap to the first recipe in %, bytes/param, tokens/s, peak memory) and DIR/loss.png.
Train options are those of `leantrain train --help`.
"""


def _compare(args: list[str]) -> int:
    from .compare import compare, default_out

    recipes, args = _take_option(args, "recipes")
    out, args = _take_option(args, "out")
    config_path, args = _take_option(args, "config")
    compare((recipes or "fp32,bf16,bf16-sr").split(","), out or default_out(), args, config_path)
    return 0


PLAN_USAGE = """usage: leantrain plan [--model.flavor=70B | --model.hf_checkpoint=DIR] [--recipe=NAME|all]
                      [--parallelism.dp_shard=N]
                      [--gpu-memory=80GiB] [--data.seq_len=S] [--data.local_batch_size=B] [--json]

Counts the model's parameters exactly (built on the meta device) and prints, per GPU and recipe, the
bytes of weights, gradients and optimizer state (laid out by the optimizer itself, divided by the FSDP
degree dp_shard), an activation estimate with and without activation checkpointing, the total, and
whether it fits in --gpu-memory. Any train option (model.*, data.*) applies; with model.hf_checkpoint,
only the folder's config.json is read (no weights are needed). The activation formula is
explained in leantrain/plan.py and the README.
"""


def _plan(args: list[str]) -> int:
    from .config import load_config, parse_overrides
    from .errors import ConfigError
    from .config import RECIPES
    from .plan import format_plan, parse_bytes, plan, to_json

    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    recipe, args = _take_option(args, "recipe")
    memory, args = _take_option(args, "gpu-memory")
    config_path, args = _take_option(args, "config")
    recipes = list(RECIPES) if recipe in (None, "all") else recipe.split(",")
    for r in recipes:
        if r not in RECIPES:
            raise ConfigError(f"--recipe={r!r} is not a recipe; allowed: all, {', '.join(RECIPES)}.")
    cfg = load_config(config_path, parse_overrides(args))  # validates parallelism.dp_shard too
    # The degree of the GPUs being planned for, not of this process (which runplan.resolve would decide):
    # -1 ("every rank") means one process here, so no sharding.
    dp_shard = max(1, cfg.parallelism.dp_shard)
    result = plan(cfg, recipes, dp_shard, parse_bytes(memory or "80GiB"))
    print(to_json(result) if as_json else format_plan(result))
    return 0


EVAL_USAGE = """usage: leantrain eval (--checkpoint DIR | --model.hf_checkpoint=DIR) [--data.path=PATH] [--out FILE]
                      [--eval.steps=N] [--section.key=value ...]

Prints the mean loss (over every predicted token; SFT: every response token) and the perplexity of a
leantrain checkpoint (a step-N folder, or a run folder: its latest checkpoint) or of a local Hugging Face
folder (llama, mistral, qwen2, qwen3), and writes them as JSON to --out, or to eval-step-N.json in the
checkpoint's run folder (eval.json in job.dump_folder for an HF model). With --data.path, all of that
data is evaluated; without it, the held-out split (last 5%) of the checkpoint run's data. --eval.steps=N
stops after N batches. A checkpoint brings its run's settings (tokenizer, seq_len, dtype); options override them.
"""


def _eval(args: list[str]) -> int:
    from .config import parse_overrides

    checkpoint_path, args = _take_option(args, "checkpoint")
    out, args = _take_option(args, "out")
    from .evaluation import run_eval

    run_eval(checkpoint_path, parse_overrides(args), out)
    return 0


EXPORT_USAGE = """usage: leantrain export --checkpoint DIR --out HF_DIR

Writes the model of a leantrain checkpoint (a step-N folder, or a run folder: its latest checkpoint) as a
Hugging Face folder of the model_type it was loaded as (llama for the flavors; mistral, qwen2 or qwen3
for a run started from such a folder): config.json and safetensors (in the dtype it was trained in;
sharded above 5 GiB), plus tokenizer.json when the run used one.
transformers.AutoModelForCausalLM.from_pretrained(HF_DIR) loads it.
"""


def _export(args: list[str]) -> int:
    from .errors import ConfigError

    checkpoint_path, args = _take_option(args, "checkpoint")
    out, args = _take_option(args, "out")
    if not checkpoint_path or not out or args:
        raise ConfigError(f"leantrain export needs --checkpoint DIR and --out HF_DIR"
                          f"{' and nothing else (got ' + ' '.join(args) + ')' if args else ''}.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is an existing file; export writes a folder (config.json, safetensors, "
                          f"tokenizer.json). Name a new or empty folder.")
    from .checkpoint import load_model, saved_config
    from .data import build_tokenizer
    from .errors import DataError
    from .hf import save_hf

    model, info = load_model(checkpoint_path)
    tokenizer_path = saved_config(info).tokenizer.path
    try:
        tokenizer = build_tokenizer(tokenizer_path)
    except DataError as e:
        warnings.warn(f"The run's tokenizer could not be loaded ({e}); exporting the weights without it.")
        tokenizer = None
    save_hf(model, out, tokenizer=tokenizer)
    print(f"leantrain: exported {info['path']} (step {info['step']}) to {out} as a Hugging Face "
          f"{model.args.family} folder.", flush=True)
    return 0


GENERATE_USAGE = """usage: leantrain generate (--checkpoint DIR | --model.hf_checkpoint=DIR) --prompt TEXT
                          [--max_new_tokens N] [--temperature T] [--top_p P] [--seed S] [--section.key=value ...]

Prints the prompt and its continuation by a leantrain run's model (a run folder: its latest checkpoint, or
its final model/ folder; a checkpoints folder; a step-N folder) or a local Hugging Face folder (llama,
mistral, qwen2, qwen3), in the model's dtype with a KV cache. The prompt is encoded with BOS by the run's
tokenizer (an HF folder: its tokenizer.json; --tokenizer.path overrides). --temperature 0 (default) is
greedy; above 0, tokens are sampled from softmax(logits / T) within the top-p nucleus (--top_p, default 1),
with a generator seeded by --seed (default 0): the same options give the same text. Stops after
--max_new_tokens (default 64, or fewer where the model's positions end) or at EOS.
"""


def _number(args: list[str], name: str, kind: type, default: Any) -> tuple[Any, list[str]]:
    """--name VALUE taken from args and read as ``kind`` (ConfigError, exit 2, when it is not one)."""
    from .errors import ConfigError

    text, args = _take_option(args, name)
    if text is None:
        return default, args
    try:
        return kind(text), args
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"--{name}={text!r} is not {what}.") from None


def _generate(args: list[str]) -> int:
    from .config import parse_overrides
    from .errors import ConfigError

    checkpoint_path, args = _take_option(args, "checkpoint")
    prompt, args = _take_option(args, "prompt")
    max_new_tokens, args = _number(args, "max_new_tokens", int, None)
    temperature, args = _number(args, "temperature", float, 0.0)
    top_p, args = _number(args, "top_p", float, 1.0)
    seed, args = _number(args, "seed", int, 0)
    if prompt is None:
        raise ConfigError("leantrain generate needs --prompt TEXT (the text to continue).")
    from .generate import run_generate

    run_generate(checkpoint_path, parse_overrides(args), prompt, max_new_tokens, temperature, top_p, seed)
    return 0


PREPARE_USAGE = """usage: leantrain prepare --data.path=SRC --out DIR [--tokenizer.path=TOK] [--workers N]
                         [--data.format=text|sft|chat] [--data.text_field=FIELD] [--shard-tokens N]
                         [--model.hf_checkpoint=HF_DIR]

Tokenizes a corpus once into DIR, a prepared folder that `leantrain train --data.path=DIR` (and eval,
compare) memory-maps: training starts at once and its memory does not grow with the corpus. SRC is a .txt,
.jsonl or .parquet file or a folder of them, read as a stream; FIELD is the .jsonl field or .parquet
column with the text (default text). TOK as for train (default auto: model.hf_checkpoint's tokenizer.json,
else byte); a run must use the same tokenizer. N worker processes tokenize (default: every core).
DIR gets token shards (uint16 when the vocabulary fits, else uint32) of about --shard-tokens tokens
(default 134217728) with a document index each, and manifest.json. Interrupted, the same command resumes;
a folder without manifest.json is never read as data. The last 5% of documents are the eval split.
--data.format=sft or chat tokenizes SFT records (prompt/response, or messages through the tokenizer's chat
template) into samples with their target masks; a run packs and cuts them for its own data.seq_len.
"""

_PREPARE_KEYS = ("data.path", "data.format", "data.text_field", "tokenizer.path", "model.hf_checkpoint")


def _prepare(args: list[str]) -> int:
    from .config import load_config, parse_overrides
    from .errors import ConfigError
    from .runplan import tokenizer_path

    out, args = _take_option(args, "out")
    workers, args = _number(args, "workers", int, 0)
    shard_tokens, args = _number(args, "shard-tokens", int, None)
    overrides = parse_overrides(args)
    other = [k for k in overrides if k not in _PREPARE_KEYS]
    if other or not out or "data.path" not in overrides:
        raise ConfigError("leantrain prepare needs --data.path=SRC and --out DIR, and takes only --workers, "
                          f"--shard-tokens and {', '.join('--' + k for k in _PREPARE_KEYS)}"
                          f"{' (got ' + ', '.join(other) + ')' if other else ''}.")
    if workers < 0:
        raise ConfigError(f"--workers={workers}: give a positive number of processes (0 or absent: every core).")
    cfg = load_config(None, overrides)
    from .data.prepared import SHARD_TOKENS
    from .prepare import prepare

    prepare(cfg.data.path, tokenizer_path(cfg), out, workers, cfg.data.text_field,
            SHARD_TOKENS if shard_tokens is None else shard_tokens, progress_bar=sys.stderr.isatty(),
            kind=cfg.data.format)
    return 0


COMMANDS = {"train": _train, "compare": _compare, "plan": _plan, "eval": _eval, "export": _export,
            "generate": _generate, "prepare": _prepare}


SUMMARIES = {
    "train": "train a model (one process, or every rank under torchrun); resumes from its checkpoints",
    "compare": "train the same model under several precision recipes, same init and batches; a report",
    "plan": "will this model and recipe fit in GPU memory? bytes per GPU, counted on the meta device",
    "eval": "loss and perplexity of a run's model or a Hugging Face model on held-out or given data",
    "export": "write a run's model as a Hugging Face Llama folder (config.json, safetensors, tokenizer)",
    "generate": "continue a prompt with a run's model or a Hugging Face model (greedy or sampled, KV cache)",
    "prepare": "tokenize a corpus once, in parallel, into memory-mapped shards that train reads at any size",
}
TOP_USAGE = ("usage: leantrain COMMAND [options]   (leantrain COMMAND --help for its options)\n\n"
             "Memory-lean precision training for Llama-style models: full bfloat16 that converges like fp32.\n\n"
             "commands:\n" + "\n".join(f"  {name:<9} {text}" for name, text in SUMMARIES.items()) +
             "\n\n  --version  the installed version")


def _usage(command: str) -> str:
    """``leantrain COMMAND --help``: train's lists every config key from the dataclasses' docstrings."""
    if command == "train":
        from .config import help_text

        return USAGE + "\n" + help_text()
    return {"compare": COMPARE_USAGE, "plan": PLAN_USAGE, "eval": EVAL_USAGE, "export": EXPORT_USAGE,
            "generate": GENERATE_USAGE, "prepare": PREPARE_USAGE}[command]


def main(argv: list[str] | None = None, hooks: Any = None) -> int:
    """The command line; ``hooks`` (a leantrain.hooks.Hooks) reaches the trainer of ``train``, for fault tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    if not distributed.is_main():  # under torchrun, rank 0 speaks for all (same config, same warnings)
        warnings.filterwarnings("ignore", category=UserWarning)
    if argv and argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"leantrain {version('leantrain')}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(TOP_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"leantrain: error: unknown command '{command}'; available: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(_usage(command))
        return 0
    try:
        return COMMANDS[command](rest, hooks) if command == "train" else COMMANDS[command](rest)
    except LeantrainError as e:  # bad input (2), training diverged (3): the message, no traceback
        print("leantrain: error: " + _wrap(str(e)), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
