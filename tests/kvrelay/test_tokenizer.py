"""Tokenizer layer against two independent references, on a few hundred varied strings.

A: transformers' own GGUF conversion (its vocabulary, merges, special tokens and chat template), with its
   pre-tokenizer replaced by the one SmolLM2's published tokenizer.json uses.
B: a small pure-python copy of llama.cpp's BPE (its regexes, run the way unicode_regex_split runs them).
And the trap: transformers' GGUF conversion left as it is splits digits the GPT-2 way, which gives other ids.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import gguf
import pytest
import regex

from gateway.detokenizer import IncrementalDetokenizer
from kvrelay.tokenizer import Tokenizer
from services.model.gguf_tokenizer import tokenizer_files_from_gguf, write_tokenizer_files

transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")

# llama.cpp's regexes (llm_tokenizer_bpe in llama-vocab.cpp), per pre-tokenizer.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
SMOLLM_RES = (r"\p{N}", GPT2_RE)
LLAMA3_RES = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
DEFAULT_RES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")


# ---------------------------------------------------------------------------------------------------------------
# Reference B: llama.cpp's BPE, in plain python


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


class LlamaCppBpe:
    def __init__(self, reader, regexes: tuple[str, ...], ignore_merges: bool = False):
        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        types = reader.fields["tokenizer.ggml.token_type"].contents()
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {}
        for rank, merge in enumerate(reader.fields["tokenizer.ggml.merges"].contents()):
            cut = merge.index(" ", 1)  # llama.cpp splits a merge at the first space after its first character
            self.ranks[merge[:cut], merge[cut + 1 :]] = rank
        specials = sorted((t for t, k in zip(tokens, types, strict=True) if k in (3, 4)), key=len, reverse=True)
        self.special_re = regex.compile("|".join(map(regex.escape, specials)))
        self.regexes = [regex.compile(r) for r in regexes]
        self.ignore_merges = ignore_merges
        self.byte_chars = bytes_to_unicode()

    def encode(self, text: str) -> list[int]:
        ids, pos = [], 0
        for m in self.special_re.finditer(text):  # special tokens are cut out first (tokenizer_st_partition)
            ids += self.encode_text(text[pos : m.start()]) + [self.vocab[m.group()]]
            pos = m.end()
        return ids + self.encode_text(text[pos:])

    def encode_text(self, text: str) -> list[int]:
        pieces = [text] if text else []
        for pattern in self.regexes:  # each regex splits the pieces of the previous one; unmatched text stays
            out = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    out += [piece[pos : m.start()]] if m.start() > pos else []
                    out += [m.group()] if m.group() else []
                    pos = m.end()
                out += [piece[pos:]] if pos < len(piece) else []
            pieces = out
        return [i for piece in pieces for i in self.bpe("".join(self.byte_chars[b] for b in piece.encode()))]

    def bpe(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        symbols = list(word)
        while len(symbols) > 1:  # merge the lowest-rank pair, leftmost first (llama.cpp's queue order)
            rank, i = min((self.ranks.get(pair, 1 << 30), i) for i, pair in enumerate(itertools.pairwise(symbols)))
            if rank == 1 << 30:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return [self.vocab[s] for s in symbols]


# ---------------------------------------------------------------------------------------------------------------
# Corpus

FRAGMENTS = [
    # digits and numbers
    "2024", "3.14159", "1,000,000", "+1 (555) 123-4567", "555-0100", "12345", "007", "1e-10", "v1.2.3", "100%",
    "$19.99", "1/2", "x =    42", "  7 days", "E = mc²", "½ cup", "٣٤٥ ١٢", "१२३", "Ⅻ", "①②", "0x1F", "2.0e+3",
    # whitespace
    "  ", "\t", "\n\n", "a  b", "a\t\tb", " \n \n", "   leading", "trailing   ", "\r\n", "\u00a0nbsp", "\u3000x",
    "line1\nline2\n\n\nline3", "\t\tindented", "a \n\tb",
    # emoji, incl. ZWJ sequences, flags and modifiers
    "🦙", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "👍🏽", "❤️", "🏳️‍🌈", "🤖 robots", "😀😃😄",
    # CJK, Arabic, Cyrillic, Greek, accented Latin, combining marks
    "中文分词测试", "日本語のテキスト", "한국어 문장", "漢字とひらがな", "مرحبا بالعالم", "العربية ١٢٣", "Привет, мир!",
    "Γειά σου Κόσμε", "café naïve résumé", "Ångström", "Straße", "ñandú", "Đặng Thị", "e\u0301", "zero\u200bwidth",
    # contractions (llama.cpp's GPT-2 regex is case-sensitive)
    "I'm", "don't", "they'll", "she'd", "We've", "IT'S", "you're",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2.5, null], "nested": {"ok": true}}',
    "if __name__ == '__main__':\n    main()",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    # misc
    "a", "!!!", "...", "https://example.com/path?q=1&r=2", "email@example.com", "¯\\_(ツ)_/¯", "ÿ", "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    # special tokens embedded in text
    "<|im_start|>user\nHi<|im_end|>", "text<|endoftext|>more", "<|im_start|><|im_start|>", "<|im_start", "<repo_name>x",
]  # fmt: skip


def make_corpus() -> list[str]:
    rng = random.Random(1234)
    corpus = list(FRAGMENTS)
    for _ in range(260):
        parts = rng.sample(FRAGMENTS, rng.randint(2, 4))
        corpus.append("".join(p + rng.choice(["", " ", "\n", "  ", "\t", ", ", "   "]) for p in parts))
    return corpus


CORPUS = make_corpus()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures (module-scoped: reading the GGUF takes seconds)


@pytest.fixture(scope="module")
def reader(default_gguf_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(default_gguf_path))


@pytest.fixture(scope="module")
def tok_dir(reader, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(reader, folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_pair(default_gguf_path, tmp_path_factory):
    """(transformers as it converts the GGUF, the same with SmolLM2's published pre-tokenizer): backend, tokenizer."""
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    (folder / default_gguf_path.name).symlink_to(default_gguf_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=default_gguf_path.name)
    plain = hf_tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    pre = hf_tokenizers.pre_tokenizers
    hf.backend_tokenizer.pre_tokenizer = pre.Sequence(
        [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return plain, hf


class FakeReader:
    """The real file's fields with some replaced or removed: other pre-tokenizers on a real vocabulary."""

    class Value:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    def __init__(self, reader, **overrides):
        self.fields = dict(reader.fields)
        for key, value in overrides.items():
            key = "tokenizer." + key.replace("__", ".")
            if value is None:
                self.fields.pop(key, None)
            else:
                self.fields[key] = self.Value(value)


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def test_files_and_properties(tok, tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>" and config["eos_token_ids"] == [2, 0]
    assert "{% for message in messages %}" in config["chat_template"]
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2, 0)
    assert tok.encode("<|im_start|>") == [1] and tok.encode("a<|im_end|>b")[1] == 2
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token is False


def test_matches_transformers_with_smollm2_pre_tokenizer(tok, hf_pair):
    _, hf = hf_pair
    for text in CORPUS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)


def test_matches_llama_cpp_bpe(tok, reader):
    ref = LlamaCppBpe(reader, SMOLLM_RES)
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_decode_round_trips(tok):
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_trap_plain_transformers_conversion_splits_digits_differently(tok, hf_pair):
    plain, _ = hf_pair
    # Every digit is its own piece in SmolLM2 (and llama.cpp's "smollm"): "12345" is five tokens.
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")
    # GPT-2 rules keep " 4" together, so a run of spaces before a number splits "  " + " 4" instead of "   " + "4".
    assert tok.encode("x =   42") != plain.encode("x =   42", add_special_tokens=False).ids
    differ = [t for t in CORPUS if tok.encode(t) != plain.encode(t, add_special_tokens=False).ids]
    assert differ and all(regex.search(r"\p{N}", t) for t in differ)


def test_other_pre_tokenizers(reader, hf_pair):
    plain, _ = hf_pair
    texts = CORPUS[::3]
    # "gpt-2": plain GPT-2 rules, which is what transformers uses for a name it does not know.
    gpt2 = Tokenizer.from_files(*tokenizer_files_from_gguf(FakeReader(reader, ggml__pre="gpt-2")))
    assert all(gpt2.encode(t) == plain.encode(t, add_special_tokens=False).ids for t in texts)
    # "llama-bpe": the Llama 3 regex, whole pieces looked up before merging, BOS unless the file says otherwise.
    llama3 = Tokenizer.from_files(
        *tokenizer_files_from_gguf(FakeReader(reader, ggml__pre="llama-bpe", ggml__add_bos_token=None))
    )
    ref = LlamaCppBpe(reader, LLAMA3_RES, ignore_merges=True)
    assert all(llama3.encode(t) == ref.encode(t) for t in texts)
    assert llama3.encode("hi", add_special_tokens=True) == [1, *llama3.encode("hi")]
    # "default" (or no name): llama.cpp's four-regex fallback.
    default = Tokenizer.from_files(*tokenizer_files_from_gguf(FakeReader(reader, ggml__pre=None)))
    ref = LlamaCppBpe(reader, DEFAULT_RES)
    assert all(default.encode(t) == ref.encode(t) for t in texts)


def test_unsupported_files_raise(reader):
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        tokenizer_files_from_gguf(FakeReader(reader, ggml__model="llama"))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='no-such-pre'"):
        tokenizer_files_from_gguf(FakeReader(reader, ggml__pre="no-such-pre"))


def test_from_dir_reads_chat_template_file_and_generation_eos(tok_dir, tmp_path):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    config.pop("eos_token_ids")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (2, 5) and tok.chat_template == template


def test_bos_follows_the_post_processor_when_the_config_is_silent(tok_dir):
    tokenizer_json = json.loads((tok_dir / "tokenizer.json").read_text())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    tokenizer_json["post_processor"]["single"].insert(0, bos)  # as in Llama 3's HF files
    config.pop("add_bos_token")
    assert Tokenizer.from_files(tokenizer_json, config).encode("hi", add_special_tokens=True) == [1, 6004]
    config["add_bos_token"] = False  # an explicit flag wins
    assert Tokenizer.from_files(tokenizer_json, config).encode("hi", add_special_tokens=True) == [6004]


# ---------------------------------------------------------------------------------------------------------------
# Chat template

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, with emoji 🦙 and 中文?\n\nThanks  "},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": '{"q": 1}'},
        {"role": "assistant", "content": '{"a": 3.14159}'},
        {"role": "user", "content": "   spaces\tand tabs   "},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf_pair, messages):
    _, hf = hf_pair
    text = tok.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(messages) == ids
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )


FEATURE_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(count=0) %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% generation %}[{{ m.role }}] {{ m.content | tojson }}{% endgeneration %}
{% endfor %}
count={{ ns.count }} year={{ strftime_now('%Y') | length }} thinking={{ enable_thinking | default(true) }}
{% if add_generation_prompt %}{{ eos_token }}<|im_start|>assistant
{% endif %}"""


def test_chat_template_features_match_transformers(tok_dir, hf_pair):
    _, hf = hf_pair
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    ours = Tokenizer.from_files((tok_dir / "tokenizer.json").read_text(), {**config, "chat_template": FEATURE_TEMPLATE})
    messages = [
        {"role": "system", "content": "<b>&'quotes'\" é 中"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "cut by break"},
    ]
    for kwargs in ({}, {"enable_thinking": False}):
        expected = hf.apply_chat_template(
            messages, chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert ours.apply_chat_template(messages, **kwargs) == expected
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(Exception, match="bad role robot") as ours_error:
        ours.apply_chat_template(bad)
    with pytest.raises(Exception, match="bad role robot") as hf_error:
        hf.apply_chat_template(bad, chat_template=FEATURE_TEMPLATE, tokenize=False)
    assert type(ours_error.value) is type(hf_error.value)


# ---------------------------------------------------------------------------------------------------------------
# Incremental detokenizer

MULTIBYTE = [t for t in CORPUS if any(ord(c) > 127 for c in t)]


def stream(tok, ids, chunk_sizes, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    out, pos = [], 0
    for size in chunk_sizes:
        out.append(detok.add(ids[pos : pos + size]))
        pos += size
    assert pos >= len(ids)
    return [*out, detok.flush()]


def test_detokenizer_token_by_token(tok):
    assert len(MULTIBYTE) > 100
    for text in MULTIBYTE:
        ids = tok.encode(text)
        chunks = stream(tok, ids, [1] * len(ids))
        assert not any("\ufffd" in c for c in chunks), repr(text)
        assert "".join(chunks) == tok.decode(ids) == text


def test_detokenizer_random_chunks_with_prompt_context(tok):
    rng = random.Random(7)
    prompt = tok.encode_chat([{"role": "user", "content": "Say something 🌍"}])
    for text in MULTIBYTE:
        ids = tok.encode(text)
        sizes = [rng.randint(0, 5) for _ in range(len(ids) + 1)] + [len(ids)]
        for skip in (False, True):
            chunks = stream(tok, ids, sizes, prompt_ids=prompt, skip_special_tokens=skip)
            assert not any("\ufffd" in c for c in chunks), repr(text)
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_back_a_split_character(tok):
    ids = tok.encode("🦙")
    assert len(ids) > 1  # one emoji, several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]
    assert detok.flush() == ""


def test_detokenizer_broken_bytes_come_out_where_decode_puts_them(tok):
    byte = bytes_to_unicode()
    lone_continuation, lead = tok.token_to_id(byte[0x80]), tok.token_to_id(byte[0xE4])
    for ids in ([lone_continuation, *tok.encode("ab")], [*tok.encode("ok "), lead]):
        chunks = stream(tok, ids, [1] * len(ids))
        assert "".join(chunks) == tok.decode(ids) and "\ufffd" in tok.decode(ids)


def test_detokenizer_decodes_a_short_window(tok, monkeypatch):
    ids = tok.encode(" ".join(MULTIBYTE))
    assert len(ids) > 2000
    windows = []
    decode = tok.decode

    def spy(window, skip_special_tokens=False):
        windows.append(len(window))
        return decode(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    chunks = stream(tok, ids, [1] * len(ids))
    monkeypatch.undo()
    assert "".join(chunks) == tok.decode(ids)
    assert max(windows) <= 16  # a character's tokens plus the previous chunk, never the whole sequence
