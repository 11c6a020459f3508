"""SFT records -> token samples: prompt/response pairs, and chat ``messages`` rendered with a chat template.

One record of a ``.jsonl`` line or ``.parquet`` row becomes one sample, ``(ids, mask)``: the token ids (int32)
and a bool array of the same length, ``mask[j]`` True when token ``j`` is a training target (the loss learns to
predict it from the tokens before it). :func:`record_sample` is the one function that does it, for every format,
so that a preparing worker can call it per record and store tokens and mask.

Chat templates are rendered the way transformers' ``apply_chat_template`` renders them: jinja2's immutable
sandbox with ``trim_blocks`` and ``lstrip_blocks``, the loop controls, a ``tojson`` filter that does not escape
HTML, ``raise_exception`` and ``strftime_now``, and ``{% generation %}`` blocks (which only mark the assistant's
text for transformers) rendered as their body. The variables are ``messages``, ``add_generation_prompt`` and
the special tokens named in tokenizer_config.json (``bos_token``, ``eos_token``, ...). The rendered text is
tokenized with the special tokens recognised in it and none added.

The assistant turns are found without ``{% generation %}`` tags: for each assistant message ``i`` the template
renders ``messages[:i]`` with the generation prompt and ``messages[:i + 1]``; both must be prefixes of the whole
conversation's rendering (templates that rewrite earlier turns, e.g. dropping reasoning, are refused), and the
text between them, up to the end of its end-of-turn token (whitespace after it is not a target), is the span
whose tokens are targets.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from leantrain.errors import DataError

from .corpus import _parquet_batches, _read_jsonl
from .tokenizer import ByteTokenizer, Tokenizer, read_tokenizer_config

SFT_SUFFIXES = (".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")
_ALLOWED = {
    "sft": (
        "data.format=sft needs data.path to be a .jsonl or .parquet file (one record per line or row with "
        '"prompt" and "response" strings, or "prompt" and "completion") or a folder of such files'
    ),
    "chat": (
        "data.format=chat needs data.path to be a .jsonl or .parquet file (one record per line or row with "
        '"messages": a list of {"role": "system"|"user"|"assistant", "content": string}, at least one of '
        "them an assistant turn) or a folder of such files"
    ),
}

# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


def sft_files(path: str, fmt: str) -> list[Path]:
    """``data.path`` -> the .jsonl/.parquet files it names (a folder: recursively, sorted, hidden ones skipped)."""
    allowed = _ALLOWED[fmt]
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path!r} does not exist. {allowed}.")
    if p.is_dir():
        files = sorted(
            (
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SFT_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        if not files:
            raise DataError(f"data.path={path!r} is a folder with no .jsonl or .parquet files in it. {allowed}.")
        return files
    if p.suffix.lower() not in SFT_SUFFIXES:
        raise DataError(f"data.path={path!r} is not a .jsonl or .parquet file. {allowed}.")
    return [p]


def read_records(path: str, fmt: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of ``data.path``, in file and line (row) order; where is 'file:line'
    (.jsonl) or 'file:row N' (.parquet, N from 1)."""
    for f in sft_files(path, fmt):
        if f.suffix.lower() == ".jsonl":
            for lineno, rec in _read_jsonl(f):
                yield f"{f}:{lineno}", rec
        else:
            rows = (rec for batch in _parquet_batches(f, None, 0) for rec in batch)
            for row, rec in enumerate(rows, start=1):
                yield f"{f}:row {row}", rec


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

# For tokenizers without a template (the byte tokenizer, a bare tokenizer.json): Llama 3's layout, without its
# date and tool preamble. eot_token is <|eot_id|> where the tokenizer has it, else its EOS (so generation stops).
BUILTIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + eot_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
BYTE_SPECIAL = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257}  # the byte tokenizer's BOS and EOS as text
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the variables it is rendered with."""

    source: str  # the Jinja text
    origin: str  # where it came from, for messages
    variables: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... (and eot_token, built in)


def chat_template(tokenizer: Tokenizer) -> ChatTemplate:
    """The tokenizer's chat template: ``chat_template`` of the tokenizer_config.json beside its tokenizer.json
    (a string, or a list of {"name", "template"} of which "default" is used), else a chat_template.jinja file
    beside it, else :data:`BUILTIN_TEMPLATE` (always for the byte tokenizer)."""
    if isinstance(tokenizer, ByteTokenizer):
        return ChatTemplate(
            BUILTIN_TEMPLATE,
            "the built-in Llama 3 style template",
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "eot_token": "<|end_of_text|>"},
        )
    folder = Path(getattr(tokenizer, "path", ".")).parent
    config = read_tokenizer_config(folder / "tokenizer_config.json")
    variables = {k: v for k in _SPECIAL_KEYS if (v := _token_text(config.get(k))) is not None}
    source, origin = _template_of(config, folder / "tokenizer_config.json"), f"{folder / 'tokenizer_config.json'}"
    if source is None and (folder / "chat_template.jinja").is_file():
        source, origin = (
            (folder / "chat_template.jinja").read_text(encoding="utf-8"),
            str(folder / "chat_template.jinja"),
        )
    if source is not None:
        return ChatTemplate(source, f"the chat template of {origin}", variables)
    names = _token_names(tokenizer)
    tok = getattr(tokenizer, "_tok", None)
    has_eot = tok is not None and tok.token_to_id("<|eot_id|>") is not None
    eot = "<|eot_id|>" if has_eot else variables.get("eos_token", names.get("eos_token", ""))
    return ChatTemplate(
        BUILTIN_TEMPLATE, "the built-in Llama 3 style template", {**names, **variables, "eot_token": eot}
    )


def _template_of(config: dict, path: Path) -> str | None:
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates, as transformers saves several
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise DataError(
        f'{path}: chat_template must be a string, or a list of {{"name", "template"}} objects with '
        f'one named "default" (the one leantrain uses); it is {json.dumps(value)[:200]}.'
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_names(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token/eos_token as the text of the tokenizer's BOS/EOS ids (for the built-in template)."""
    tok = getattr(tokenizer, "_tok", None)
    out = {}
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        text = tok.id_to_token(token_id) if tok is not None and token_id is not None else None
        if text is not None:
            out[key] = text
    return out


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    """The template compiled in an environment like transformers' (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: transformers' assistant marker; rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(
    template: ChatTemplate, messages: Sequence[dict], add_generation_prompt: bool = False, where: str = ""
) -> str:
    """The conversation as text, as transformers' apply_chat_template(tokenize=False) renders it."""
    import jinja2

    try:
        compiled = _compiled(template.source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(
            f"{template.origin} is not valid Jinja (line {e.lineno}: {e.message}); fix the "
            "template, or remove it to use the built-in Llama 3 style one."
        ) from e
    try:
        return compiled.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **template.variables
        )
    except jinja2.TemplateError as e:
        raise DataError(
            f"{where + ': ' if where else ''}{template.origin} failed to render this conversation "
            f"({type(e).__name__}: {e}). Conversations must have the shape the template expects "
            "(e.g. roles in the order it allows)."
        ) from e


# --------------------------------------------------------------------------------------------
# Records -> samples
# --------------------------------------------------------------------------------------------


def record_sample(
    record: dict, fmt: str, tokenizer: Tokenizer, template: ChatTemplate | None = None, where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (ids int32, mask bool), ``mask[j]`` True when token j is a target.

    ``fmt="sft"``: ``{"prompt", "response"}`` (or ``"completion"``) strings: ``[BOS] + prompt + response + EOS``,
    the targets the response and its EOS. ``fmt="chat"``: ``{"messages": [...]}`` rendered with ``template``
    (default: :func:`chat_template` of the tokenizer), the targets every assistant turn and its end-of-turn token.
    """
    if fmt == "chat":
        messages = check_messages(record, where)
        return chat_sample(messages, template or chat_template(tokenizer), tokenizer, where)
    prompt, response = prompt_response(record, where)
    return sft_sample(prompt, response, tokenizer)


def prompt_response(record: dict, where: str) -> tuple[str, str]:
    answer_key = "completion" if "completion" in record and "response" not in record else "response"
    for key in ("prompt", answer_key):
        if key not in record:
            keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            hint = ' (a "messages" conversation is data.format=chat)' if "messages" in record else ""
            raise DataError(f'{where}: the record has no "{key}" field (its keys: {keys}){hint}. {_ALLOWED["sft"]}.')
        if not isinstance(record[key], str):
            raise DataError(f'{where}: "{key}" is a {type(record[key]).__name__}, not a string. {_ALLOWED["sft"]}.')
    return record["prompt"], record[answer_key]


def sft_sample(prompt: str, response: str, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    ids = np.asarray([*head, *p, *r, tokenizer.eos_id], dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.bool_)
    mask[len(head) + len(p) :] = True
    return ids, mask


def check_messages(record: dict, where: str) -> list[dict]:
    """The record's messages, checked: a non-empty list of {"role", "content"} with known roles and string
    content, with at least one assistant turn."""
    allowed = _ALLOWED["chat"]
    messages = record.get("messages")
    if messages is None:
        keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        hint = " (prompt/response pairs are data.format=sft)" if "prompt" in record else ""
        raise DataError(f'{where}: the record has no "messages" field (its keys: {keys}){hint}. {allowed}.')
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list, it is {json.dumps(messages)[:100]}. {allowed}.')
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(
                f'{where}: message {n} is {json.dumps(m)[:100]}, not an object with "role" and "content". {allowed}.'
            )
        if m["role"] not in ROLES:
            extra = (
                " Tool calls and tool results are not supported: leave such conversations out, or write "
                "the tool output into a user turn."
                if m["role"] in ("tool", "ipython", "function")
                else ""
            )
            raise DataError(f"{where}: message {n} has the role {m['role']!r}.{extra} {allowed}.")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: message {n}'s content is a {type(m['content']).__name__}, not a string "
                f"(content parts, images and tool calls are not supported). {allowed}."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn. {allowed}.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def assistant_spans(messages: list[dict], template: ChatTemplate, where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of its assistant turns with their end-of-turn token)."""
    text = render(template, messages, where=where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(template, messages[:i], add_generation_prompt=True, where=where)
        turn = render(template, messages[: i + 1], where=where)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise DataError(
                f"{where}: {template.origin} is not prefix-stable for this conversation: rendering the first "
                f"{i} message(s) with the generation prompt, then the first {i + 1}, does not give prefixes of the "
                f"whole conversation's text (the template rewrites earlier turns, e.g. drops their reasoning, or "
                f"adds text only at the end). leantrain finds the assistant turns from these prefixes, so it needs "
                f"a template that renders each turn the same whatever follows it."
            )
        end = len(turn.rstrip())  # the end-of-turn token is a target; the newline after it (ChatML) is not
        spans.append((len(prompt), max(end, len(prompt))))
    return text, spans


def chat_sample(
    messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer, where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """A checked conversation -> (ids, mask): the tokens whose first character lies in an assistant span."""
    text, spans = assistant_spans(messages, template, where)
    ids, starts = encode_with_offsets(tokenizer, text)
    mask = np.zeros(len(ids), dtype=np.bool_)
    for a, b in spans:
        mask[bisect.bisect_left(starts, a) : bisect.bisect_left(starts, b)] = True
    return ids, mask


def encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, list[int]]:
    """Rendered text -> (ids int32, each token's first character index), special tokens recognised in it."""
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_encode_with_offsets(text)
    tok = getattr(tokenizer, "_tok", None)
    if tok is None:
        raise DataError(
            f"data.format=chat needs the byte tokenizer or a Hugging Face tokenizer.json, not "
            f"{type(tokenizer).__name__}."
        )
    enc = tok.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, dtype=np.int32), [s for s, _ in enc.offsets]


def _byte_encode_with_offsets(text: str) -> tuple[np.ndarray, list[int]]:
    """UTF-8 bytes, with BYTE_SPECIAL's names as their ids. Byte encoding is context-free, so encoding the pieces
    between the special names one by one is the same as encoding the whole text."""
    ids: list[np.ndarray] = []
    starts: list[int] = []
    pos = 0
    while pos < len(text):
        found = [(i, name) for name in BYTE_SPECIAL if (i := text.find(name, pos)) >= 0]
        nxt, name = min(found) if found else (len(text), None)
        piece = text[pos:nxt]
        if piece:
            ids.append(np.frombuffer(piece.encode("utf-8"), dtype=np.uint8).astype(np.int32))
            if piece.isascii():
                starts.extend(range(pos, nxt))
            else:  # every byte of a character starts at that character
                starts.extend(pos + c for c, ch in enumerate(piece) for _ in range(len(ch.encode("utf-8"))))
        if name is not None:
            ids.append(np.asarray([BYTE_SPECIAL[name]], dtype=np.int32))
            starts.append(nxt)
            nxt += len(name)
        pos = nxt
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)), starts
