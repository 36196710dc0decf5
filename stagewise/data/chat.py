"""Chat templates: a conversation rendered and encoded exactly as transformers' `apply_chat_template`
does, plus the mask of the tokens supervised fine-tuning trains on.

A model's template is untrusted Jinja from the hub, so it runs in jinja2's immutable sandbox with the
globals and filters transformers gives it (`raise_exception`, `strftime_now`, a non-escaping
`tojson`, an underscore-refusing `namespace`) and its `{% generation %}` tag. Parity is what matters:
a model fine-tuned on text that differs from what its template renders at inference (one newline, a
default system prompt) learns a format nobody will prompt it with.

The assistant mask comes from the template's `{% generation %}` markers when it has them (the same
spans transformers returns as `assistant_masks`). Hub templates rarely have them, so otherwise each
assistant message's span is derived by rendering: it starts where the conversation up to that message
plus the generation prompt stops agreeing with the full rendering (so a header the model is prompted
with is never trained, while text the template adds after it, such as Qwen3's empty `<think>` block on
the last turn, is, as the model must generate it), and it ends after the first end-of-turn token that
follows (trained, so the model learns to stop; the newline after it is not).

Where the template comes from (`read_template`), in the order AutoTokenizer reads it: `chat_template.jinja`
beside tokenizer.json, else tokenizer_config.json's `chat_template` (a string, or a list of
{name, template} of which "default" is used). A tokenizer with `<|im_start|>`/`<|im_end|>` and
neither file (every stagewise-trained BPE) gets the built-in ChatML template (`chatml`).
"""

from __future__ import annotations

import json
import re
import weakref
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from stagewise.data.special_tokens import _json, _token_name
from stagewise.errors import DataError

if TYPE_CHECKING:
    from stagewise.data.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"  # what transformers >= 5 writes beside tokenizer.json
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_ORIGIN = "built-in ChatML"
# The built-in template renders plain ChatML (what Qwen and most open chat models use), with
# generation markers so the mask needs no derivation and an exported model keeps assistant-only loss.
CHATML = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}\n"
    "        {{- '\\n' }}\n"
    "    {%- else %}\n"
    "        {{- message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
# Tokens that close a turn in the template families stagewise knows (ChatML, Gemma, Llama 3, Phi-3,
# Llama 3.1's end of a tool-calling message). Only those the template itself writes are used.
END_OF_TURN = (IM_END, "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>")
# Literal strings in a template that must be single tokens of the tokenizer: `<|name|>` control
# tokens and Gemma's turn markers. `<think>`-style tags are left out: they are text to some vocabularies.
_CONTROL = re.compile(r"<\|[^<>|\s\0]{1,64}\|>|<(?:start|end)_of_turn>")
# The variables transformers passes from the tokenizer's special tokens (SPECIAL_TOKENS_ATTRIBUTES).
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is what templates read
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplate:
    """A Jinja chat template, the special-token strings it may refer to (`tokens`: bos_token,
    eos_token, ... as transformers passes them) and where it came from (`origin`, for errors)."""

    def __init__(self, source: str, origin: str, tokens: Optional[Mapping[str, str]] = None):
        self.source, self.origin = source, origin
        self.tokens = dict(tokens or {})
        self._checked: weakref.WeakSet = weakref.WeakSet()  # tokenizers already known to fit

    def __getstate__(self) -> dict:  # picklable (to data-loading processes); the cache is rebuilt there
        return {"source": self.source, "origin": self.origin, "tokens": self.tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["source"], state["origin"], state["tokens"])

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, generation_markers={self.has_generation_markers})"

    @property
    def builtin(self) -> bool:
        return self.origin == CHATML_ORIGIN

    @property
    def has_generation_markers(self) -> bool:
        return bool(_GENERATION_TAG.search(self.source))

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
               where: str = "conversation", **variables) -> str:
        """The text `apply_chat_template(messages, tokenize=False)` returns; `variables` are extra
        template variables (e.g. enable_thinking=False for Qwen3)."""
        return self._render(messages, add_generation_prompt, where, variables, track=False)[0]

    def encode(self, tokenizer: "Tokenizer", messages: Sequence[Mapping], add_generation_prompt: bool = False,
               only_last: bool = False, where: str = "conversation", **variables) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask): ids as `apply_chat_template(tokenize=True)` gives them, the mask True
        on the tokens to train on, every assistant message's or with `only_last` the final one's (a
        prompt/completion row's completion). Raises DataError when nothing would be trained."""
        self.check(tokenizer, where)
        text, spans = self._render(messages, add_generation_prompt, where, variables,
                                   track=self.has_generation_markers)
        if spans is None:
            spans = self._derived_spans(tokenizer, messages, text, only_last, where, variables)
        elif only_last:
            spans = spans[-1:]
        ids, offsets = tokenizer.encode_chat(text)
        mask = _token_mask(offsets, spans)
        if not any(mask):
            raise DataError(f"{where}: no assistant tokens to train on (the chat template from {self.origin} "
                            "rendered no assistant content); every conversation needs a non-empty assistant reply")
        return ids, mask

    def prompt_ids(self, tokenizer: "Tokenizer", messages: Sequence[Mapping], where: str = "prompt",
                   **variables) -> list[int]:
        """The ids a model is prompted with to write the next assistant message (add_generation_prompt)."""
        self.check(tokenizer, where)
        return tokenizer.encode_chat(self.render(messages, True, where, **variables))[0]

    def stop_ids(self, tokenizer: "Tokenizer") -> tuple[int, ...]:
        """What generation stops at: the end-of-turn tokens the template writes, then the tokenizer's
        own stop tokens (eos and generation_config.json's)."""
        turn_ends = [tokenizer.backend.token_to_id(t) for t in END_OF_TURN if t in self._literals]
        return tuple(dict.fromkeys([i for i in turn_ends if i is not None] + list(tokenizer.stop_ids)))

    def check(self, tokenizer: "Tokenizer", where: str = "chat template") -> None:
        """DataError unless every control token the template writes is one token of `tokenizer`."""
        if tokenizer in self._checked:
            return
        for name in sorted(set(_CONTROL.findall(self._literals))):
            if len(tokenizer.encode_chat(name)[0]) != 1:
                raise DataError(f"{where}: the chat template from {self.origin} writes {name!r}, which is not a "
                                f"token of this tokenizer (vocab {tokenizer.vocab_size}); use the model's own "
                                "tokenizer, or a stagewise-trained BPE (it has <|im_start|> and <|im_end|>)")
        self._checked.add(tokenizer)

    @property
    def _literals(self) -> str:
        return _literal_text(self.source, self.origin)

    def _render(self, messages, add_generation_prompt, where, variables, track):
        """(text, generation spans or None): the spans, as transformers' AssistantTracker records them."""
        template = _compile(self.source, self.origin)
        context = {**self.tokens, **variables, "messages": _template_messages(messages), "tools": None,
                   "documents": None, "add_generation_prompt": add_generation_prompt}
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _TRACKING.set((blocks, spans) if track else None)
        try:
            for block in template.generate(**context):
                blocks.append(block)
        except Exception as e:  # the template is user code: whatever it raises is a template or row error
            raise DataError(f"{where}: the chat template from {self.origin} failed to render "
                            f"({type(e).__name__}: {_first_line(e)})") from None
        finally:
            _TRACKING.reset(token)
        return "".join(blocks), (spans if track else None)

    def _derived_spans(self, tokenizer, messages, text, only_last, where, variables) -> list[tuple[int, int]]:
        """Character spans of the assistant messages in `text`, for a template without markers."""
        ends = [t for t in END_OF_TURN if t in self._literals] + [tokenizer.eos_token]
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        spans: list[tuple[int, int]] = []
        floor = 0
        for i in turns[-1:] if only_last else turns:
            if i == 0:
                raise DataError(f"{where}: message 1 is an assistant reply with no prompt before it")
            header = self._render(messages[:i], True, where, variables, track=False)[0]
            start = _common_prefix(header, text)
            if start < floor:  # the prompt for this turn re-renders an earlier turn differently
                raise DataError(f"{where}: cannot find assistant message {i + 1} in the chat rendered by the "
                                f"template from {self.origin} (the conversation before it renders differently "
                                "on its own); use a template with {% generation %} markers")
            found = [(k, e) for e in ends if (k := text.find(e, start)) >= 0]
            if not found:
                raise DataError(f"{where}: cannot find assistant message {i + 1} in the chat rendered by the "
                                f"template from {self.origin} (no end-of-turn token, one of {', '.join(ends)}, "
                                "after it); use a template with {% generation %} markers")
            k, e = min(found)
            spans.append((start, k + len(e)))
            floor = k + len(e)
        return spans


def chatml(tokens: Optional[Mapping[str, str]] = None) -> ChatTemplate:
    return ChatTemplate(CHATML, CHATML_ORIGIN, tokens)


def has_chatml_tokens(tok: HFTokenizer) -> bool:
    """Whether a `tokenizers.Tokenizer` has ChatML's two tokens (a vocabulary look-up: this runs on
    every load; `ChatTemplate.check` verifies they encode as one id before any chat is encoded)."""
    return all(tok.token_to_id(t) is not None for t in (IM_START, IM_END))


def require_template(tokenizer: "Tokenizer", where: str = "tokenizer") -> ChatTemplate:
    """The tokenizer's chat template, or a DataError saying how to give it one."""
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: the tokenizer has no chat template (no {TEMPLATE_FILE} or tokenizer_config.json "
                        f"chat_template beside tokenizer.json, and no {IM_START}/{IM_END} tokens for the built-in "
                        "ChatML); use an instruct model's tokenizer or retrain the BPE with this stagewise")
    return tokenizer.chat_template


def read_template(directory: Path, tokens: Mapping[str, str]) -> Optional[ChatTemplate]:
    """The chat template saved beside a tokenizer.json in `directory` (order in the module docstring),
    with `tokens` (the tokenizer's bos/eos strings) over the other special-token names
    tokenizer_config.json gives; None when there is none."""
    config = _json(directory / "tokenizer_config.json") or {}
    names = {k: n for k in TOKEN_NAMES if (n := _token_name(config.get(k))) is not None}
    names.update(tokens)
    jinja_file = directory / TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            return ChatTemplate(jinja_file.read_text(encoding="utf-8"), str(jinja_file), names)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{jinja_file}: not a readable UTF-8 chat template ({e})") from None
    if config.get("chat_template") is not None:
        path = directory / "tokenizer_config.json"
        return ChatTemplate(_default_template(config["chat_template"], path), str(path), names)
    return None  # a processor's chat_template.json is not read: AutoTokenizer does not read it either


def write_template(template: ChatTemplate, directory: Path) -> None:
    (Path(directory) / TEMPLATE_FILE).write_text(template.source, encoding="utf-8")


def _default_template(value, path: Path) -> str:
    """The template a chat_template entry names: a string, or the "default" of named templates."""
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        value = {t.get("name"): t.get("template") for t in value}
    if isinstance(value, dict):
        if "default" not in value:
            names = ", ".join(sorted(str(k) for k in value))
            raise DataError(f"{path}: chat_template has named templates ({names}) but none named 'default'")
        value = value["default"]
    if not isinstance(value, str):
        raise DataError(f"{path}: chat_template must be a Jinja string or a list of {{name, template}}, "
                        f"got {type(value).__name__}")
    return value


def _template_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as transformers hands them to a template: None-valued keys dropped (templates test
    for a key, not for None), reasoning copied under every name templates read."""
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for every token overlapping a span (transformers' rule, so a token straddling a span's
    edge is trained). Spans and offsets are both sorted, so one pass suffices."""
    mask, s = [False] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        mask[i] = end > spans[s][0]
    return mask


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search the first difference: prefixes are long, renders are many
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------------- Jinja environment

_TRACKING: ContextVar = ContextVar("stagewise_chat_generation", default=None)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a render is
    tracking, records the character span the body occupies in the output."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller) -> str:
        text = caller()
        state = _TRACKING.get()
        if state is not None:
            blocks, spans = state  # the output so far is what the template has yielded before this tag
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore attributes (a sandbox escape route) as transformers' does."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change what the template renders.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=None)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@lru_cache(maxsize=32)
def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{origin}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


@lru_cache(maxsize=32)
def _literal_text(source: str, origin: str) -> str:
    """The template's literal text and string constants, NUL-joined so a search cannot span two."""
    _compile(source, origin)  # a syntax error is reported as one
    ast = _environment().parse(source)
    literals = {n.data for n in ast.find_all(nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(literals))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
