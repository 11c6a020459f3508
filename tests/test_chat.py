"""data.format=chat: rendering like transformers' apply_chat_template, the assistant-only target mask, the built-in
template of the byte tokenizer, prompt/completion, parquet, and bad conversations and templates."""

import json

import numpy as np
import pytest

from leantrain.cli import main
from leantrain.data import ByteTokenizer, build_tokenizer, chat_template, load_sft_samples, record_sample, render
from leantrain.data.chat import ChatTemplate, chat_sample
from leantrain.errors import DataError

SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
]

# Meta-Llama-3-8B-Instruct's template, as in its tokenizer_config.json.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template (ChatML, a default system prompt), its tool branches included as written.
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# ChatML with transformers' {% generation %} markers around what the assistant writes (SmolLM3 / TRL style).
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen": (QWEN, None, "<|im_end|>", "<|im_end|>"),
    "chatml-generation": (CHATML_GENERATION, None, "<|im_end|>", "<|im_end|>"),
}

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Hi. How are you?"},
        {"role": "user", "content": "fine, and you?"},
        {"role": "assistant", "content": "I am fine.\nThanks for asking!"},
    ],
    [
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "sure?"},
        {"role": "assistant", "content": "yes, I am: ünïcödé ✓"},
    ],
]


def _tokenizer_folder(folder, template, bos, eos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(m["content"] for c in CONVERSATIONS for m in c) + " user assistant system\n\n"] * 20
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": eos, "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if bos:
        config["bos_token"] = bos
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _runs(mask):
    """(start, stop) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_rendering_equals_transformers_apply_chat_template(tmp_path, style):
    transformers = pytest.importorskip("transformers")
    source, bos, eos, _ = TEMPLATES[style]
    folder = _tokenizer_folder(tmp_path / style, source, bos, eos)
    ours, theirs = build_tokenizer(str(folder)), transformers.AutoTokenizer.from_pretrained(str(folder))
    template = chat_template(ours)
    assert template.source == source
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            text = render(template, messages, add_generation_prompt=prompt)
            assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        ids, _ = record_sample({"messages": messages}, "chat", ours)
        assert ids.tolist() == theirs.apply_chat_template(messages, tokenize=True)["input_ids"]


@pytest.mark.parametrize("style", list(TEMPLATES))
def test_the_mask_covers_exactly_each_assistant_turn_and_its_end_token(tmp_path, style):
    source, bos, eos, end_of_turn = TEMPLATES[style]
    tok = build_tokenizer(str(_tokenizer_folder(tmp_path / style, source, bos, eos)))
    for messages in CONVERSATIONS:
        ids, mask = record_sample({"messages": messages}, "chat", tok)
        turns = [tok.decode(ids[a:b].tolist()) for a, b in _runs(mask)]
        assert turns == [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]


def test_the_mask_equals_transformers_generation_mask(tmp_path):
    """Where the template marks the assistant's text with {% generation %}, transformers returns that mask: ours,
    found from prefixes without the tags, is the same."""
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_folder(tmp_path / "gen", CHATML_GENERATION, None, "<|im_end|>")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        _, mask = record_sample({"messages": messages}, "chat", build_tokenizer(str(folder)))
        out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert mask.astype(int).tolist() == out["assistant_masks"]


def test_byte_tokenizer_uses_the_builtin_llama3_style_template():
    byte = ByteTokenizer()
    messages = CONVERSATIONS[1]
    ids, mask = record_sample({"messages": messages}, "chat", byte)
    text = render(chat_template(byte), messages)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhow are you?<|end_of_text|>")
    assert ids[0] == byte.bos_id and (ids == byte.eos_id).sum() == len(messages)  # end of turn = EOS: generation stops
    assert byte.decode(ids.tolist()) == text.replace("<|begin_of_text|>", "").replace("<|end_of_text|>", "")
    runs = _runs(mask)
    assert [bytes(ids[a : b - 1].astype(np.uint8)).decode() for a, b in runs] == ["fine", "yes, I am: ünïcödé ✓"]
    assert all(ids[b - 1] == byte.eos_id for _, b in runs)  # each turn's EOS is a target
    # the generation prompt of the last turn is exactly what precedes its span
    prompt = render(chat_template(byte), messages[:3], add_generation_prompt=True)
    assert runs[1][0] == len(prompt.replace("<|begin_of_text|>", "x").replace("<|end_of_text|>", "x").encode())


def test_a_tokenizer_without_template_gets_the_builtin_one(tmp_path):
    tok = build_tokenizer(str(_tokenizer_folder(tmp_path / "none", None, "<|begin_of_text|>", "<|end_of_text|>")))
    template = chat_template(tok)
    assert "built-in" in template.origin and template.variables["eot_token"] == "<|eot_id|>"
    ids, mask = record_sample({"messages": CONVERSATIONS[1]}, "chat", tok)
    assert ids[0] == tok.bos_id
    assert [tok.decode(ids[a:b].tolist()) for a, b in _runs(mask)] == [
        "fine<|eot_id|>",
        "yes, I am: ünïcödé ✓<|eot_id|>",
    ]


def test_template_from_chat_template_jinja_or_a_named_list(tmp_path):
    folder = _tokenizer_folder(tmp_path / "jinja", None, None, "<|im_end|>")
    (folder / "chat_template.jinja").write_text(CHATML_GENERATION)
    assert chat_template(build_tokenizer(str(folder))).source == CHATML_GENERATION
    named = _tokenizer_folder(
        tmp_path / "named",
        [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3}],
        None,
        "<|eot_id|>",
    )
    assert chat_template(build_tokenizer(str(named))).source == LLAMA3


def test_prompt_completion_is_accepted_beside_prompt_response(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "response": "d"}\n')
    assert load_sft_samples(str(path)) == [("a", "b"), ("c", "d")]
    ids, mask = record_sample({"prompt": "ab", "completion": "cd"}, "sft", ByteTokenizer())
    assert ids.tolist() == [256, 97, 98, 99, 100, 257] and mask.tolist() == [False] * 3 + [True] * 3


def test_chat_parquet_is_read_like_jsonl(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    from leantrain.data import load_samples

    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in CONVERSATIONS]), str(tmp_path / "chat.parquet"))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    a = load_samples(str(tmp_path / "chat.parquet"), "chat", ByteTokenizer())
    b = load_samples(str(tmp_path / "chat.jsonl"), "chat", ByteTokenizer())
    assert len(a) == 2 and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize(
    "messages, says",
    [
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}], "Tool calls and tool results are not"),
        ([{"role": "robot", "content": "hi"}], "message 0 has the role 'robot'"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        (
            [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}],
            "content is a list, not a string",
        ),
        ([{"role": "user"}], 'not an object with "role" and "content"'),
        ([], "must be a non-empty list"),
    ],
)
def test_bad_conversations_are_refused_naming_the_line(tmp_path, capsys, messages, says):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match="chat.jsonl:2: .*" + says):
        from leantrain.data import load_samples

        load_samples(str(path), "chat", ByteTokenizer())
    assert (
        main(
            [
                "train",
                "--data.format=chat",
                f"--data.path={path}",
                "--model.flavor=debug",
                "--compile.enable=false",
                f"--job.dump_folder={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "chat.jsonl:2:" in err and says in err and "Traceback" not in err


def test_a_template_that_is_not_prefix_stable_is_refused():
    # Rewrites earlier turns by what follows them (as templates that drop past reasoning do).
    template = ChatTemplate(
        "{% for m in messages %}{{ m['role'] }}{{ messages | length }}: {{ m['content'] }}\n{% endfor %}",
        "a test template",
    )
    with pytest.raises(DataError, match="x.jsonl:3: a test template is not prefix-stable"):
        chat_sample(CONVERSATIONS[0], template, ByteTokenizer(), "x.jsonl:3")


def test_a_template_that_fails_to_render_says_why():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}", "a strict template"
    )
    with pytest.raises(DataError, match="x.jsonl:1: a strict template failed to render .*user first"):
        chat_sample(CONVERSATIONS[0], template, ByteTokenizer(), "x.jsonl:1")
    with pytest.raises(DataError, match="is not valid Jinja"):
        chat_sample(CONVERSATIONS[1], ChatTemplate("{% for %}", "a broken template"), ByteTokenizer())


def test_chat_needs_jsonl_or_parquet_data(capsys):
    assert main(["train", "--data.format=chat", "--data.path=builtin"]) == 2
    assert "messages" in capsys.readouterr().err
