"""Text <-> token ids for the gateway: HF tokenizer files run by the `tokenizers` library, chat templates by jinja2.

Chat templates render as transformers renders them (same sandbox, options, filters and globals), so a prompt built
here gets the ids a model card's examples show.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """One model's tokenizer: encode/decode, special ids, and its chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any], extra_eos_ids: Iterable[int] = ()):
        self._backend = backend
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: tokenizers >= 0.21
        self._special_tokens = {key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))}
        self._bos_id = self._id_of(self._special_tokens.get("bos_token"))
        self._eos_id = self._id_of(self._special_tokens.get("eos_token"))
        # Where the config is silent (Llama 3's HF files), the post-processor in tokenizer.json says what HF adds.
        probe = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        add_bos = config.get("add_bos_token", probe[:1] == [self._bos_id] != plain[:1])
        add_eos = config.get("add_eos_token", probe[-1:] == [self._eos_id] != plain[-1:])
        self._add_bos = bool(add_bos) and self._bos_id is not None
        self._add_eos = bool(add_eos) and self._eos_id is not None
        eos_ids = [self._eos_id, *config.get("eos_token_ids", ()), *extra_eos_ids]
        self._eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        template = config.get("chat_template")
        if isinstance(template, list):  # older HF configs: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self._chat_template: str | None = template

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json (plus chat_template.jinja and generation_config.json's eos
        ids when present) from an HF model directory."""
        path = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_path = path / "chat_template.jinja"  # where transformers >= 4.47 saves the template
        if not config.get("chat_template") and template_path.is_file():
            config["chat_template"] = template_path.read_text(encoding="utf-8")
        # Instruct models often end turns with a token other than eos_token (Llama 3: <|eot_id|>); HF lists them here.
        extra_eos: list[int] = []
        generation_path = path / "generation_config.json"
        if generation_path.is_file():
            eos = json.loads(generation_path.read_text(encoding="utf-8")).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else list(eos or ())
        return cls(backend, config, extra_eos)

    @classmethod
    def from_files(cls, tokenizer_json: Mapping[str, Any] | str, tokenizer_config: Mapping[str, Any]) -> Tokenizer:
        """Build from the contents of tokenizer.json (dict or JSON text) and tokenizer_config.json."""
        text = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json)
        return cls(tokenizers.Tokenizer.from_str(text), tokenizer_config)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation, eos_token's first."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (like "<|im_start|>") become their single ids.

        With add_special_tokens, BOS (and EOS) are added only where the tokenizer config asks for them; chat
        templates write their own, so encode_chat never adds them.
        """
        # Ids come from the model alone; BOS/EOS are added here, never by tokenizer.json's post-processor, so a
        # directory whose post-processor also adds BOS cannot get it twice.
        # encode_batch, not encode: it releases the GIL while it works, and encode holds it throughout (a 3.9 MB prompt
        # tokenized in a gateway thread stalled its event loop for the 4 s it took). The _fast variant skips the
        # character offsets nobody here reads (half the time); the ids are the same.
        ids = self._encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self._add_bos:
            ids.insert(0, self._bos_id)
        if add_special_tokens and self._add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for a conversation [{"role": ..., "content": ...}, ...], rendered as transformers'
        apply_chat_template(tokenize=False) renders it. Extra keyword arguments reach the template (e.g.
        enable_thinking) and override the special-token variables."""
        if self._chat_template is None:
            raise ValueError("this model has no chat template; send a raw prompt instead")
        variables = {**self._special_tokens, **kwargs}
        return _compile(self._chat_template).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        # As transformers does: the template writes any BOS itself, so no special tokens are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body unchanged;
    without it, templates that use the tag would not even parse."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, as transformers' does: templates come from model repositories,
    and dunder attributes are how sandbox escapes start."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)
