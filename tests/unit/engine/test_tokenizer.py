from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engine.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    load_tokenizer,
)

TEXTS = [
    "Hello world",
    "café naïve façade über",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "日本語のテキスト, 中文",
    "mixed: a€b£c😀d",
]
# Pieces random texts are built from: ASCII, 2-, 3- and 4-byte characters.
PIECES = ["a", "b", " ", ".", "é", "ñ", "€", "日", "😀", "👍🏽", "\n"]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30)))


def _stream(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.push(token_id) for token_id in output_ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


# ---- tokenizers built offline --------------------------------------------------------------


def _save_byte_level_bpe(folder: Path) -> None:
    """GPT-2 style byte-level BPE trained on ASCII only, so other characters span tokens."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog"], trainer)
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    fast.save_pretrained(folder)
    eos = [raw.token_to_id("</s>"), raw.token_to_id("<|eot|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))


def _save_sentencepiece_style(folder: Path) -> None:
    """Llama 2 style: '▁' marks spaces, byte fallback, decoder strips one leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for piece in ["▁", *letters, ",", "."]:
        vocab[piece] = len(vocab)
    merges = [("▁", c) for c in letters]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    raw = RawTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    )
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def byte_level_bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("bpe")
    _save_byte_level_bpe(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def sentencepiece_style(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("sp")
    _save_sentencepiece_style(folder)
    return load_tokenizer(folder)


# ---- ByteTokenizer -------------------------------------------------------------------------


def test_byte_tokenizer_encode_prepends_bos() -> None:
    assert ByteTokenizer().encode("hé€") == [256, 104, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert ByteTokenizer().encode("") == [256]


def test_byte_tokenizer_decode_skips_specials_and_replaces_bad_bytes() -> None:
    tok = ByteTokenizer()
    assert tok.decode([256, 104, 105, 257, 258]) == "hi"
    assert tok.decode([104, 0xE2, 0x82]) == "h\ufffd"
    assert tok.decode([104, 5000, 105]) == "hi"  # id from a larger dummy vocabulary


def test_byte_tokenizer_rejects_negative_ids() -> None:
    with pytest.raises(ValueError, match="token id -1 is negative"):
        ByteTokenizer().decode([104, -1])


def test_byte_tokenizer_properties() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_token_ids, tok.bos_token_id) == (259, (257,), 256)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


# ---- load_tokenizer / HFTokenizer ----------------------------------------------------------


def test_load_tokenizer_without_folder_or_files_is_bytes(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_load_tokenizer_missing_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"tokenizer folder {folder} does not exist"):
        load_tokenizer(folder)


def test_hf_tokenizer_properties(byte_level_bpe: Tokenizer) -> None:
    assert isinstance(byte_level_bpe, HFTokenizer)
    # <s>=0, </s>=1, <pad>=2, <|eot|>=3; 256 byte symbols; merges fill up to 300.
    assert byte_level_bpe.bos_token_id == 0
    assert byte_level_bpe.eos_token_ids == (1, 3)
    assert byte_level_bpe.vocab_size == 300


def test_hf_tokenizer_encode_adds_bos_and_decode_skips_specials(
    byte_level_bpe: Tokenizer,
) -> None:
    ids = byte_level_bpe.encode("Hello")
    assert ids[0] == 0
    assert byte_level_bpe.decode([*ids, 1, 3]) == "Hello"


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizers_round_trip(
    byte_level_bpe: Tokenizer, sentencepiece_style: Tokenizer, text: str
) -> None:
    assert byte_level_bpe.decode(byte_level_bpe.encode(text)) == text
    assert sentencepiece_style.decode(sentencepiece_style.encode(text)) == text


# ---- IncrementalDetokenizer ----------------------------------------------------------------


def test_detok_holds_incomplete_utf8_until_complete() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("x"))

    deltas = [detok.push(b) for b in "a€😀b".encode()]

    assert deltas == ["a", "", "", "€", "", "", "", "😀", "b"]
    assert detok.text == "a€😀b"
    assert detok.flush() == ""


def test_detok_flush_returns_incomplete_tail() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])

    assert [detok.push(b) for b in (0x61, 0xE2, 0x82)] == ["a", "", ""]
    assert detok.flush() == "\ufffd"
    assert detok.text == "a\ufffd"


def test_detok_skips_special_tokens() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("p"))

    assert [detok.push(t) for t in (0x68, 258, 0x69, 257)] == ["h", "", "i", ""]


@pytest.mark.parametrize("seed", range(20))
def test_detok_byte_invariant_random_text(seed: int) -> None:
    rng = random.Random(seed)
    tok = ByteTokenizer()
    prompt, output = tok.encode(_random_text(rng)), list(_random_text(rng).encode())

    deltas = _stream(tok, prompt, output)

    assert "".join(deltas) == tok.decode(output)
    assert deltas[-1] == ""
    assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("seed", range(20))
def test_detok_byte_invariant_random_bytes(seed: int) -> None:
    # Arbitrary bytes, invalid UTF-8 included: deltas plus flush still equal the whole decode.
    rng = random.Random(seed)
    tok = ByteTokenizer()
    prompt = tok.encode(_random_text(rng))
    output = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100)]) for _ in range(40)]

    assert "".join(_stream(tok, prompt, output)) == tok.decode(output)


@pytest.mark.parametrize("seed", range(20))
def test_detok_byte_level_bpe_invariant(byte_level_bpe: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    prompt = byte_level_bpe.encode(_random_text(rng))
    output = byte_level_bpe.encode(_random_text(rng))[1:]  # drop the BOS

    deltas = _stream(byte_level_bpe, prompt, output)

    assert "".join(deltas) == byte_level_bpe.decode(output)
    assert all("\ufffd" not in delta for delta in deltas)


def test_detok_byte_level_bpe_splits_emoji(byte_level_bpe: Tokenizer) -> None:
    output = byte_level_bpe.encode("é😀")[1:]
    assert len(output) == 6  # one token per byte: the training text was ASCII

    assert _stream(byte_level_bpe, byte_level_bpe.encode("hi"), output) == [
        "",
        "é",
        "",
        "",
        "",
        "😀",
        "",
    ]


def test_detok_sentencepiece_keeps_leading_space_of_first_token(
    sentencepiece_style: Tokenizer,
) -> None:
    tok = sentencepiece_style
    ids = tok.encode("Hello world café 😀")
    prompt, output = ids[:6], ids[6:]  # prompt: <s> ▁H e l l o

    deltas = _stream(tok, prompt, output)

    # Token by token, '▁w' decodes alone to "w": the space is lost without context.
    assert tok.decode(output[:1]) == "w"
    assert deltas[0] == " w"
    assert "".join(deltas) == " world café 😀"


@pytest.mark.parametrize("seed", range(20))
def test_detok_sentencepiece_invariant(sentencepiece_style: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    tok = sentencepiece_style
    ids = tok.encode(_random_text(rng) + _random_text(rng))
    # A prompt ends on a whole character: encode never splits one between two requests.
    splits = [i for i in range(1, len(ids)) if "\ufffd" not in tok.decode(ids[:i])]
    split = rng.choice(splits)
    prompt, output = ids[:split], ids[split:]

    deltas = _stream(tok, prompt, output)

    whole, prompt_text = tok.decode(ids), tok.decode(prompt)
    assert whole.startswith(prompt_text)
    assert "".join(deltas) == whole[len(prompt_text) :]
    assert all("\ufffd" not in delta for delta in deltas)


def test_detok_first_window_does_not_cut_a_prompt_character(
    sentencepiece_style: Tokenizer,
) -> None:
    tok = sentencepiece_style
    prompt = tok.encode("a😀😀")  # <s> ▁a + 8 byte tokens: 5 back from the end cuts the 1st 😀
    assert len(prompt) == 10
    output = tok.encode("a👍")[2:]  # the 4 byte tokens of 👍

    assert _stream(tok, prompt, output) == ["", "", "", "👍", ""]
