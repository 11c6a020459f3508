"""The command line: ``leantrain COMMAND [options]`` (``leantrain COMMAND --help``).

:data:`COMMANDS` is the one table of commands: each one's summary, usage, handler, its own options and the config
keys it takes. The top-level help, the dispatch, the parsing of each command's options and the check of its keys
all come from it.
"""

from __future__ import annotations

import os
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from . import distributed
from .errors import ConfigError, LeantrainError, UserError


def _wrap(text: str) -> str:
    """A message wrapped at 100 columns between words only: a path, a key=value or a hyphenated word is never cut
    (a reader copies them, and a cut would put a space inside them for anyone who joins the lines again)."""
    return textwrap.fill(text, 100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return "leantrain: warning: " + _wrap(str(message)) + "\n"


# ---- a command's own options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A command's own ``--name VALUE`` (or, for kind bool, a bare ``--name`` flag), apart from the config keys."""

    name: str
    kind: type = str
    default: Any = None


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


def _take_options(args: list[str], options: tuple[Option, ...]) -> tuple[dict[str, Any], list[str]]:
    """Each option's value (read as its kind; ConfigError, exit 2, when it is not one) and the args left."""
    values: dict[str, Any] = {}
    for option in options:
        if option.kind is bool:
            values[option.name] = f"--{option.name}" in args
            args = [a for a in args if a != f"--{option.name}"]
            continue
        text, args = _take_option(args, option.name)
        try:
            values[option.name] = option.default if text is None else option.kind(text)
        except ValueError:
            what = "a whole number" if option.kind is int else "a number"
            raise ConfigError(f"--{option.name}={text!r} is not {what}.") from None
    return values, args


# ---- the commands -----------------------------------------------------------------------------------------


def _train(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    from .config import load_config
    from .guard import stop_on_signals
    from .hooks import Hooks
    from .runplan import resolve
    from .train import train

    plan = resolve(load_config(opts["config"], overrides))
    with stop_on_signals():  # SIGTERM/SIGINT: finish the step, save, exit 0; a second one: exit at once
        train(plan, hooks or Hooks())
    return 0


def _compare(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    from .compare import compare, default_out

    train_args = [f"--{key}={value}" for key, value in overrides.items()]
    compare(
        (opts["recipes"] or "fp32,bf16,bf16-sr").split(","), opts["out"] or default_out(), train_args, opts["config"]
    )
    return 0


def _plan(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    from .config import RECIPES, load_config
    from .plan import format_largest, format_plan, largest, parse_bytes, plan, to_json

    recipe = opts["recipe"]
    recipes = list(RECIPES) if recipe in (None, "all") else recipe.split(",")
    for r in recipes:
        if r not in RECIPES:
            raise ConfigError(f"--recipe={r!r} is not a recipe; allowed: all, {', '.join(RECIPES)}.")
    cfg = load_config(opts["config"], overrides)  # validates parallelism.dp_shard too
    # The degree of the GPUs being planned for, not of this process (which runplan.resolve would decide):
    # -1 ("every rank") means one process here, so no sharding.
    dp_shard, tp = max(1, cfg.parallelism.dp_shard), cfg.parallelism.tp
    if opts["largest"]:
        if cfg.model.hf_checkpoint:
            raise ConfigError(
                "plan --largest compares leantrain's Llama 3 flavors (1B, 3B, 8B, 70B); it does not "
                "take model.hf_checkpoint. Leave --largest out to plan that model."
            )
        result = largest(cfg, recipes, dp_shard, parse_bytes(opts["gpu-memory"]))
        print(to_json(result) if opts["json"] else format_largest(result))
        return 0
    result = plan(cfg, recipes, dp_shard, parse_bytes(opts["gpu-memory"]), tp)
    print(to_json(result) if opts["json"] else format_plan(result))
    return 0


def _eval(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    from .evaluation import run_eval

    run_eval(opts["checkpoint"], overrides, opts["out"])
    return 0


def _export(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    checkpoint_path, out = opts["checkpoint"], opts["out"]
    if not checkpoint_path or not out:
        raise ConfigError("leantrain export needs --checkpoint DIR and --out HF_DIR.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(
            f"--out {out} is an existing file; export writes a folder (config.json, safetensors, "
            f"tokenizer.json). Name a new or empty folder."
        )
    from .errors import DataError
    from .hf import save_hf
    from .loader import load_checkpoint, load_tokenizer

    model, cfg, info = load_checkpoint(checkpoint_path)
    try:
        tokenizer = load_tokenizer(cfg)
    except (DataError, ConfigError) as e:
        warnings.warn(f"The run's tokenizer could not be loaded ({e}); exporting the weights without it.")
        tokenizer = None
    save_hf(model, out, tokenizer=tokenizer)
    print(
        f"leantrain: exported {info['path']} (step {info['step']}) to {out} as a Hugging Face "
        f"{model.args.family} folder.",
        flush=True,
    )
    return 0


def _generate(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    if opts["prompt"] is None:
        raise ConfigError("leantrain generate needs --prompt TEXT (the text to continue).")
    from .generate import run_generate

    run_generate(
        opts["checkpoint"],
        overrides,
        opts["prompt"],
        opts["max_new_tokens"],
        opts["temperature"],
        opts["top_p"],
        opts["seed"],
    )
    return 0


def _prepare(opts: dict[str, Any], overrides: dict[str, str], hooks: Any) -> int:
    from .config import load_config
    from .data.prepared import SHARD_TOKENS
    from .prepare import prepare
    from .runplan import tokenizer_path

    if not opts["out"] or "data.path" not in overrides:
        raise ConfigError(f"leantrain prepare needs --data.path=SRC and --out DIR. {_takes(COMMANDS['prepare'])}")
    if opts["workers"] < 0:
        raise ConfigError(
            f"--workers={opts['workers']}: give a positive number of processes (0 or absent: every core)."
        )
    cfg = load_config(None, overrides)
    shard_tokens = SHARD_TOKENS if opts["shard-tokens"] is None else opts["shard-tokens"]
    prepare(
        cfg.data.path,
        tokenizer_path(cfg),
        opts["out"],
        opts["workers"],
        cfg.data.text_field,
        shard_tokens,
        progress_bar=sys.stderr.isatty(),
        kind=cfg.data.format,
    )
    return 0


TRAIN_USAGE = """usage: leantrain train [--config FILE.toml] [--recipe NAME] [--section.key=value ...]

Train a Llama-style model. Every key below can come from the TOML file ([section] tables) or the
command line (which wins). --recipe sets a named group of precision keys (config.RECIPES):
{recipes}.
"""

COMPARE_USAGE = """usage: leantrain compare --recipes fp32,bf16,bf16-sr [--out DIR] [--config FILE.toml]
                         [train options ...]

Trains the same model from the same initial weights on the same batches under each recipe (each in
its own process), then writes DIR/<recipe>/ run folders, DIR/summary.json, DIR/report.md (final
losses, eval gap to the first recipe in %, bytes/param, tokens/s, peak memory) and DIR/loss.png.
Train options are those of `leantrain train --help`.
"""

PLAN_USAGE = """usage: leantrain plan [--model.flavor=70B | --model.hf_checkpoint=DIR] [--recipe=NAME|all]
                      [--parallelism.dp_shard=N] [--parallelism.tp=T]
                      [--gpu-memory=80GiB] [--data.seq_len=S] [--data.local_batch_size=B] [--json]
       leantrain plan --largest [--gpu-memory=24GiB] [--data.seq_len=2048] [--recipe=NAME|all] [--json]

Counts the model's parameters exactly (built on the meta device) and prints, per GPU and recipe, the
bytes of weights, gradients and optimizer state (laid out by the optimizer itself, divided by the FSDP
degree dp_shard and, for the blocks' matrices, the tensor-parallel degree tp), an activation estimate
with and without activation checkpointing, the total, and whether it fits in --gpu-memory. Any train
option (model.*, data.*) applies; with model.hf_checkpoint, only the folder's config.json is read (no
weights are needed). The activation formula is
explained in leantrain/plan.py and the README.

--largest: per recipe, the largest Llama 3 flavor (1B, 3B, 8B, 70B) whose full fine-tune fits in
--gpu-memory with full activation checkpointing and the chunked loss, and each flavor's total.
"""

EVAL_USAGE = """usage: leantrain eval (--checkpoint DIR | --model.hf_checkpoint=DIR) [--data.path=PATH] [--out FILE]
                      [--eval.steps=N] [--section.key=value ...]

Prints the mean loss (over every predicted token; SFT: every response token) and the perplexity of a
leantrain checkpoint (a step-N folder, or a run folder: its latest checkpoint) or of a local Hugging Face
folder ({families}), and writes them as JSON to --out, or to eval-step-N.json in the
checkpoint's run folder (eval.json in job.dump_folder for an HF model). With --data.path, all of that
data is evaluated; without it, the held-out split (last 5%) of the checkpoint run's data. --eval.steps=N
stops after N batches. A checkpoint brings its run's settings (tokenizer, seq_len, dtype); options override them.
"""

EXPORT_USAGE = """usage: leantrain export --checkpoint DIR --out HF_DIR

Writes the model of a leantrain checkpoint (a step-N folder, or a run folder: its latest checkpoint) as a
Hugging Face folder of the model_type it was loaded as (llama for the flavors; mistral, qwen2 or qwen3
for a run started from such a folder): config.json and safetensors (in the dtype it was trained in;
sharded above 5 GiB), and the run's tokenizer (tokenizer.json and tokenizer_config.json; the byte
tokenizer as an exact tokenizer.json), so that a fine-tune from HF_DIR needs no tokenizer flag.
transformers.AutoModelForCausalLM.from_pretrained(HF_DIR) loads it.
"""

GENERATE_USAGE = """usage: leantrain generate (--checkpoint DIR | --model.hf_checkpoint=DIR) --prompt TEXT
                          [--max_new_tokens N] [--temperature T] [--top_p P] [--seed S] [--section.key=value ...]

Prints the prompt and its continuation by a leantrain run's model (a run folder: its latest checkpoint, or
its final model/ folder; a checkpoints folder; a step-N folder) or a local Hugging Face folder
({families}), in the model's dtype with a KV cache. The prompt is encoded with BOS by the run's
tokenizer (an HF folder: its tokenizer.json; --tokenizer.path overrides). --temperature 0 (default) is
greedy; above 0, tokens are sampled from softmax(logits / T) within the top-p nucleus (--top_p, default 1),
with a generator seeded by --seed (default 0): the same options give the same text. Stops after
--max_new_tokens (default 64, or fewer where the model's positions end) or at EOS.
"""

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


@dataclass(frozen=True)
class Command:
    summary: str  # one line of the top-level help
    usage: str  # `leantrain COMMAND --help`
    handler: Callable[[dict[str, Any], dict[str, str], Any], int]  # (its options, config overrides, hooks)
    options: tuple[Option, ...] = ()
    keys: tuple[str, ...] | None = None  # the config keys it takes; None: every key (and --recipe)

    def help(self) -> str:
        usage = self.usage.format(recipes=_recipes_text(), families=_families_text())
        if self.handler is _train:  # every config key, from the dataclasses' docstrings
            from .config import help_text

            return usage + "\n" + help_text()
        return usage


def _takes(command: Command) -> str:
    """'It takes only --a, --b and --section.key.': what a command accepts, for its refusals."""
    names = [f"--{o.name}" for o in command.options] + [f"--{k}" for k in command.keys or ()]
    return (
        f"It takes only {', '.join(names[:-1])} and {names[-1]}."
        if len(names) > 1
        else f"It takes only {names[0]}."
        if names
        else "It takes no options."
    )


_CHECKPOINT, _OUT, _CONFIG = Option("checkpoint"), Option("out"), Option("config")


def _recipes_text() -> str:
    from .config import RECIPES

    return ", ".join(RECIPES)


def _families_text() -> str:
    from .families import family_names

    return family_names()


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train a model (one process, or every rank under torchrun); resumes from its checkpoints",
        TRAIN_USAGE,
        _train,
        (_CONFIG,),
    ),
    "compare": Command(
        "train the same model under several precision recipes, same init and batches; a report",
        COMPARE_USAGE,
        _compare,
        (Option("recipes"), _OUT, _CONFIG),
    ),
    "plan": Command(
        "will this model and recipe fit in GPU memory? bytes per GPU, counted on the meta device",
        PLAN_USAGE,
        _plan,
        (
            Option("recipe"),
            Option("gpu-memory", default="80GiB"),
            _CONFIG,
            Option("json", bool),
            Option("largest", bool),
        ),
    ),
    "eval": Command(
        "loss and perplexity of a run's model or a Hugging Face model on held-out or given data",
        EVAL_USAGE,
        _eval,
        (_CHECKPOINT, _OUT),
    ),
    "export": Command(
        "write a run's model and tokenizer as a Hugging Face folder (config.json, safetensors, tokenizer.json)",
        EXPORT_USAGE,
        _export,
        (_CHECKPOINT, _OUT),
        keys=(),
    ),
    "generate": Command(
        "continue a prompt with a run's model or a Hugging Face model (greedy or sampled, KV cache)",
        GENERATE_USAGE,
        _generate,
        (
            _CHECKPOINT,
            Option("prompt"),
            Option("max_new_tokens", int),
            Option("temperature", float, 0.0),
            Option("top_p", float, 1.0),
            Option("seed", int, 0),
        ),
    ),
    "prepare": Command(
        "tokenize a corpus once, in parallel, into memory-mapped shards that train reads at any size",
        PREPARE_USAGE,
        _prepare,
        (_OUT, Option("workers", int, 0), Option("shard-tokens", int)),
        keys=("data.path", "data.format", "data.text_field", "tokenizer.path", "model.hf_checkpoint"),
    ),
}

TOP_USAGE = (
    "usage: leantrain COMMAND [options]   (leantrain COMMAND --help for its options)\n\n"
    "Memory-lean precision training for Llama-style models: full bfloat16 that converges like fp32.\n\n"
    "commands:\n"
    + "\n".join(f"  {name:<9} {c.summary}" for name, c in COMMANDS.items())
    + "\n\n  --version  the installed version"
)


def _check_keys(name: str, command: Command, overrides: dict[str, str]) -> None:
    """Refuse the config keys a command does not take (exit 2), naming what it takes."""
    if command.keys is None:
        return
    other = [k for k in overrides if k not in command.keys]
    if other:
        raise ConfigError(f"leantrain {name} does not take {', '.join('--' + k for k in other)}. {_takes(command)}")


def run_command(name: str, args: list[str], hooks: Any = None) -> int:
    """Parse a command's options and config keys as its table entry says, and run it."""
    from .config import parse_overrides

    command = COMMANDS[name]
    options, rest = _take_options(args, command.options)
    overrides = parse_overrides(rest)
    _check_keys(name, command, overrides)
    return command.handler(options, overrides, hooks)


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
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"leantrain: error: unknown command '{name}'; available: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(COMMANDS[name].help())
        return 0
    try:
        return run_command(name, rest, hooks)
    except LeantrainError as e:  # bad input (2), training diverged (3): the message, no traceback
        print("leantrain: error: " + _wrap(str(e)), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
