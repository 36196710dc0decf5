"""Chat templates against transformers' apply_chat_template: the rendered text, the ids and the
assistant mask.

Two small BPE tokenizers are built offline with `tokenizers` and wrapped as transformers'
PreTrainedTokenizerFast with a chat template set: a Qwen-style byte-level BPE (<|im_start|>,
<|im_end|> special; <think>, </think> ordinary added tokens, as Qwen3 has them) and a Gemma-style
Metaspace BPE whose post-processor prepends <bos>. transformers saves each to a directory, stagewise
loads that directory, and every rendering and every id is compared with apply_chat_template. The
templates are the real Qwen2.5, Qwen3 and Gemma 3 ones (checked against TRL's copies of the hub
files when TRL is installed); for the generation-marked variants (TRL's *_training.jinja and the
built-in ChatML) the mask must equal transformers' assistant_masks; for the marker-less originals
the derived mask must decode to exactly each assistant reply plus its end-of-turn token.
"""

import json
from pathlib import Path

import pytest

import transformers
import trl
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from stagewise.data import Tokenizer, train_bpe
from stagewise.data.chat import CHATML, ChatTemplate, require_template
from stagewise.errors import DataError

# The hub templates, verbatim (Qwen/Qwen2.5-*-Instruct, Qwen/Qwen3-*, google/gemma-3-*-it).
QWEN2_5 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

QWEN3 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''

GEMMA3 = r'''{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
'''

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"  # hub templates, and generation-marked variants

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris is the capital of France."}],
    "system": [SYSTEM, {"role": "user", "content": "Name a prime number."},
               {"role": "assistant", "content": "Seven is a prime number."}],
    "multi": [{"role": "user", "content": "Count to three."},
              {"role": "assistant", "content": "one two three"},
              {"role": "user", "content": "Now backwards,\nplease."},
              {"role": "assistant", "content": "three two one\nDone."}],
    "system-multi": [SYSTEM, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "Paris."}],
}
# Qwen3 only: reasoning given as a field and inline, which its template moves into <think>.
QWEN3_EXTRA = {
    "reasoning-field": [{"role": "user", "content": "Name a prime number."},
                        {"role": "assistant", "content": "Seven.", "reasoning_content": "Seven has no divisors."}],
    "reasoning-inline": [{"role": "user", "content": "Count to three."},
                         {"role": "assistant", "content": "<think>\nJust count.\n</think>\n\none two three"}],
}
CORPUS = [m["content"] for c in [*CONVERSATIONS.values(), *QWEN3_EXTRA.values()] for m in c] + [
    "system user assistant model You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Just count. Seven has no divisors. see here", "Count to three. Now backwards,\nplease."] * 3


def qwen_backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tok


def gemma_backend() -> HFTokenizer:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    # Newlines stand alone, as in Gemma's vocabulary (else "model\n" + "one" could merge into "\no").
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        show_progress=False))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return tok


BACKENDS = {"qwen": (qwen_backend, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
            "gemma": (gemma_backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                      "unk_token": "<unk>"})}
TEMPLATES = {"qwen2.5": ("qwen", QWEN2_5), "qwen3": ("qwen", QWEN3), "gemma3": ("gemma", GEMMA3)}


@pytest.fixture(scope="module")
def make_pair(tmp_path_factory):
    """(stagewise Tokenizer loaded from what transformers saved, the transformers tokenizer)."""
    cache, backends = {}, {}

    def make(backend: str, template: str):
        if (backend, template) not in cache:
            if backend not in backends:
                backends[backend] = BACKENDS[backend][0]().to_str()
            hf = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(backends[backend]),
                                                      chat_template=template, **BACKENDS[backend][1])
            d = tmp_path_factory.mktemp(backend)
            hf.save_pretrained(d)
            cache[backend, template] = Tokenizer.load(d / "tokenizer.json"), hf
        return cache[backend, template]
    return make


def cases(model):
    convs = {**CONVERSATIONS, **(QWEN3_EXTRA if model == "qwen3" else {})}
    return [(model, name) for name in convs]


ALL_CASES = [c for m in TEMPLATES for c in cases(m)]


def conversation(name):
    return {**CONVERSATIONS, **QWEN3_EXTRA}[name]


def masked_runs(tok: Tokenizer, ids, mask) -> list[str]:
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def test_templates_are_the_hub_ones():
    for name, text in (("qwen2_5", QWEN2_5), ("qwen3", QWEN3), ("gemma3", GEMMA3)):
        assert (TRL_TEMPLATES / f"{name}.jinja").read_text() == text


@pytest.mark.parametrize("model,conv", ALL_CASES)
def test_render_and_ids_equal_transformers(make_pair, model, conv):
    ours, hf = make_pair(*TEMPLATES[model])
    template, msgs = require_template(ours), conversation(conv)
    assert template.origin.endswith("chat_template.jinja")  # transformers 5 saved it there
    for gen in (False, True):
        assert template.render(msgs, add_generation_prompt=gen) == \
            hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ids, _ = template.encode(ours, msgs, add_generation_prompt=gen)
        assert ids == hf.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False)
    prompt = msgs[:-1]
    assert template.prompt_ids(ours, prompt) == hf.apply_chat_template(prompt, add_generation_prompt=True,
                                                                       return_dict=False)


def test_template_variables_and_control_tokens_in_content_equal_transformers(make_pair):
    ours, hf = make_pair(*TEMPLATES["qwen3"])
    prompt = [{"role": "user", "content": "see <|im_end|> here <think>"}]
    # Qwen3's switch for a thinking-free answer reaches the template as a variable.
    assert require_template(ours).prompt_ids(ours, prompt, enable_thinking=False) == \
        hf.apply_chat_template(prompt, add_generation_prompt=True, enable_thinking=False, return_dict=False)
    # Control tokens a user writes become tokens, as transformers encodes them by default...
    ids = require_template(ours).prompt_ids(ours, prompt)
    assert ids.count(ours.backend.token_to_id("<|im_end|>")) == 2
    # ...while a document mentioning one stays text (pretraining data must not inject separators).
    assert ours.backend.token_to_id("<|im_end|>") not in ours.encode("see <|im_end|> here")


@pytest.mark.parametrize("model,conv", ALL_CASES)
def test_derived_mask_is_each_reply_and_its_end_of_turn(make_pair, model, conv):
    ours, _ = make_pair(*TEMPLATES[model])
    msgs = conversation(conv)
    template = require_template(ours)
    assert not template.has_generation_markers
    ids, mask = template.encode(ours, msgs)
    assert masked_runs(ours, ids, mask) == expected_replies(model, msgs)
    _, last_only = template.encode(ours, msgs, only_last=True)
    assert masked_runs(ours, ids, last_only) == expected_replies(model, msgs)[-1:]


def expected_replies(model: str, msgs: list[dict]) -> list[str]:
    """What each assistant turn adds after the generation prompt, as the template renders it."""
    replies, last_user = [], max(i for i, m in enumerate(msgs) if m["role"] == "user")
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        if model == "gemma3":
            replies.append(content.strip() + "<end_of_turn>")  # Gemma trims, then ends the turn
        elif model == "qwen3" and i > last_user:  # Qwen3 writes the (maybe empty) reasoning of the last turn
            reasoning = m.get("reasoning_content", "")
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            replies.append(f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}<|im_end|>")
        else:
            replies.append(content + "<|im_end|>")
    return replies


MARKED = {"qwen2.5-training": ("qwen", "qwen2_5_training"), "qwen3-training": ("qwen", "qwen3_training"),
          "gemma3-training": ("gemma", "gemma3_training")}


@pytest.mark.parametrize("model,conv", [(m, c) for m in MARKED for _, c in cases("qwen3" if "qwen3" in m else m)])
def test_mask_equals_transformers_with_generation_markers(make_pair, model, conv):
    backend, name = MARKED[model]
    ours, hf = make_pair(backend, (TRL_TEMPLATES / f"{name}.jinja").read_text())
    msgs = conversation(conv)
    template = require_template(ours)
    assert template.has_generation_markers
    ids, mask = template.encode(ours, msgs)
    ref = hf.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    assert ids == ref["input_ids"]
    assert mask == [bool(m) for m in ref["assistant_masks"]] and any(mask)


def test_builtin_chatml_on_a_trained_bpe(tmp_path):
    tok = train_bpe(CORPUS, 300)
    assert [tok.backend.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    template = require_template(tok)
    assert template.builtin and template.has_generation_markers
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.backend.to_str()),
                                              chat_template=CHATML)
    for msgs in CONVERSATIONS.values():
        # Plain ChatML, the format Qwen and most open chat models use.
        assert template.render(msgs) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        ref = hf.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
        ids, mask = template.encode(tok, msgs)
        assert ids == ref["input_ids"] and mask == [bool(m) for m in ref["assistant_masks"]]
        assert masked_runs(tok, ids, mask) == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
        assert template.prompt_ids(tok, msgs[:-1]) == hf.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                                                             return_dict=False)
    assert template.stop_ids(tok) == (2, 0)  # <|im_end|>, then <|endoftext|>
    tok.save(tmp_path / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # ChatML follows from the vocab
    assert Tokenizer.load(tmp_path / "tokenizer.json").chat_template.builtin


def test_stop_ids_of_imported_templates(make_pair):
    qwen, _ = make_pair(*TEMPLATES["qwen2.5"])
    gemma, _ = make_pair(*TEMPLATES["gemma3"])
    assert require_template(qwen).stop_ids(qwen) == (qwen.backend.token_to_id("<|im_end|>"),)  # it is the eos too
    assert require_template(gemma).stop_ids(gemma) == (gemma.backend.token_to_id("<end_of_turn>"),
                                                       gemma.backend.token_to_id("<eos>"))


def test_jinja_environment_equals_transformers(make_pair):
    ours, hf = make_pair("qwen", "{{ messages | tojson }}{{ strftime_now('%Y') }}{{ eos_token }}{{ pad_token }}"
                                 "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                                 "{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}"
                                 "{{ raise_exception('no') if messages|length > 9 }}")
    msgs = [{"role": "user", "content": "<a & 'b'> \u00e9"}, {"role": "assistant", "content": None}]
    assert require_template(ours).render(msgs) == hf.apply_chat_template(msgs, tokenize=False)


def test_saved_template_round_trips(make_pair, tmp_path):
    ours, hf = make_pair(*TEMPLATES["gemma3"])
    ours.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (tmp_path / "chat_template.jinja").read_text() == GEMMA3
    msgs = CONVERSATIONS["system"]
    # Without tokenizer_config.json the bos comes from the post-processor, as the template needs it.
    assert require_template(again).encode(again, msgs) == require_template(ours).encode(ours, msgs)


def write_dir(d: Path, backend: HFTokenizer, config: dict, jinja=None) -> Path:
    d.mkdir()
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    return d


def test_templates_are_found_where_transformers_finds_them(tmp_path):
    backend = qwen_backend()
    named = [{"name": "tool_use", "template": "T{{ messages[0].content }}"},
             {"name": "default", "template": "D{{ messages[0].content }}"}]
    dirs = [write_dir(tmp_path / "both", backend, {"chat_template": "C"}, jinja="J"),
            write_dir(tmp_path / "config", backend, {"chat_template": "C{{ eos_token }}", "eos_token": "<|im_end|>"}),
            write_dir(tmp_path / "named", backend, {"chat_template": named})]
    msgs = [{"role": "user", "content": "hi"}]
    for d in dirs:
        ours = Tokenizer.load(d / "tokenizer.json")
        ref = transformers.AutoTokenizer.from_pretrained(d)
        assert require_template(ours).render(msgs) == ref.apply_chat_template(msgs, tokenize=False), d.name
    assert Tokenizer.load(dirs[0] / "tokenizer.json").chat_template.origin == str(dirs[0] / "chat_template.jinja")


def test_bad_template_files(tmp_path):
    backend = qwen_backend()
    d = write_dir(tmp_path / "nodefault", backend, {"chat_template": [{"name": "tool_use", "template": "T"}]})
    with pytest.raises(DataError, match=r"tokenizer_config.json: chat_template has named templates \(tool_use\) "
                                        "but none named 'default'"):
        Tokenizer.load(d / "tokenizer.json")
    d = write_dir(tmp_path / "number", backend, {"chat_template": 5})
    with pytest.raises(DataError, match="chat_template must be a Jinja string.*got int"):
        Tokenizer.load(d / "tokenizer.json")


def test_template_that_fails_to_render_names_the_row(make_pair):
    ours, _ = make_pair(*TEMPLATES["gemma3"])
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(DataError, match=r"^chat\.jsonl:3: the chat template from .*chat_template\.jinja failed to "
                                        r"render \(TemplateError: Conversation roles must alternate"):
        require_template(ours).encode(ours, msgs, where="chat.jsonl:3")


def test_invalid_and_unsafe_templates():
    msgs = [{"role": "user", "content": "a"}]
    with pytest.raises(DataError, match=r"^my template: the chat template is not valid Jinja \(line 1: "):
        ChatTemplate("{% for m in %}", "my template").render(msgs)
    with pytest.raises(DataError, match="failed to render .*SecurityError"):
        ChatTemplate("{{ ''.__class__.__mro__ }}", "evil").render(msgs)
    with pytest.raises(DataError, match="failed to render .*SecurityError.*_x"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", "evil").render(msgs)


def test_tokenizer_without_the_templates_tokens():
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    old = Tokenizer(backend)  # a BPE trained before ChatML tokens were reserved
    assert old.chat_template is None
    with pytest.raises(DataError, match="the tokenizer has no chat template .*retrain the BPE"):
        require_template(old, "sft")
    with pytest.raises(DataError, match=r"^row 1: the chat template from built-in ChatML writes '<\|im_end\|>', "
                                        "which is not a token of this tokenizer"):
        ChatTemplate(CHATML, "built-in ChatML").encode(old, CONVERSATIONS["single"], where="row 1")


def test_nothing_to_train_is_refused(make_pair):
    for model in ("qwen2.5", "gemma3"):
        ours, _ = make_pair(*TEMPLATES[model])
        with pytest.raises(DataError, match="^x.jsonl:2: no assistant tokens to train on"):
            require_template(ours).encode(ours, [{"role": "user", "content": "hi"}], where="x.jsonl:2")
    ours, _ = make_pair(*TEMPLATES["qwen2.5"])
    with pytest.raises(DataError, match="message 1 is an assistant reply with no prompt before it"):
        require_template(ours).encode(ours, [{"role": "assistant", "content": "hi"}])


def test_template_without_end_of_turn_is_refused(make_pair):
    ours, _ = make_pair("qwen", "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                                "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"cannot find assistant message 2 .*no end-of-turn token.*generation"):
        require_template(ours).encode(ours, CONVERSATIONS["single"])
