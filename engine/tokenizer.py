"""Tokenizers and incremental detokenization.

`Tokenizer` is the small interface the engine needs; `HFTokenizer` wraps a Hugging Face
tokenizer saved in a local folder, `ByteTokenizer` is a file-free byte-level tokenizer for
tests and dummy-weight benchmarks. `load_tokenizer` picks between them.

`IncrementalDetokenizer` turns a stream of generated token ids into text deltas for
streaming. Decoding token by token is wrong in two ways: a multi-byte UTF-8 character may
span several tokens (each alone decodes to U+FFFD), and SentencePiece/BPE decoders render a
token differently depending on what precedes it (a leading-space marker is dropped at the
start of a decode). It therefore uses vLLM's prefix/read-offset method, described on the class.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG_FILE = "generation_config.json"
REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens the detokenizer decodes ahead of the first generated token, so that
# the first token is rendered in context (e.g. keeps its leading space).
DETOKENIZE_PROMPT_CONTEXT = 5
UTF8_MAX_CONTINUATION_BYTES = 3


class Tokenizer(ABC):
    """Text <-> token ids.

    `encode` returns the ids a prompt is fed to the model as, special tokens included where the
    tokenizer adds them by default (a BOS for Llama, nothing for Qwen). `decode` returns the
    user-visible text: special tokens are skipped.
    """

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (special and added tokens included)."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation."""

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None: ...


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer that needs no files.

    ids 0..255 are the bytes of the UTF-8 text; 256 = BOS, 257 = EOS, 258 = PAD.
    """

    BOS_ID = 256
    EOS_ID = 257
    PAD_ID = 258
    VOCAB_SIZE = 259

    def encode(self, text: str) -> list[int]:
        return [self.BOS_ID, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes decoded with errors="replace"; ids >= 256 (the specials, and any id a dummy
        model with a larger vocabulary samples) are skipped."""
        for token_id in ids:
            if token_id < 0:
                raise ValueError(f"token id {token_id} is negative; ids must be >= 0")
        return bytes(token_id for token_id in ids if token_id < 256).decode(
            "utf-8", errors="replace"
        )

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.EOS_ID,)

    @property
    def bos_token_id(self) -> int | None:
        return self.BOS_ID


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer loaded from a local folder (never from the Hub).

    encode uses `add_special_tokens=True`, which is how a completion prompt is fed to the model
    (vLLM does the same). decode skips special tokens and does not apply
    `clean_up_tokenization_spaces`, whose rewrites (" ." -> ".") depend on context and would
    make streamed text differ from the whole decode.

    EOS ids: the tokenizer's eos token, plus every `eos_token_id` in the folder's
    `generation_config.json` (Llama 3 instruct models end turns with <|eot_id|>, listed there).
    """

    def __init__(self, folder: Path) -> None:
        # Imported here: transformers takes seconds to import, and ByteTokenizer users
        # (tests, dummy-weight benchmarks) never need it.
        from transformers import AutoTokenizer

        folder = Path(folder)
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        eos_ids: list[int] = []
        if self._tokenizer.eos_token_id is not None:
            eos_ids.append(int(self._tokenizer.eos_token_id))
        generation_config = folder / GENERATION_CONFIG_FILE
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            listed = eos if isinstance(eos, list) else [] if eos is None else [eos]
            for token_id in listed:
                if int(token_id) not in eos_ids:
                    eos_ids.append(int(token_id))
        self._eos_token_ids = tuple(eos_ids)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        bos = self._tokenizer.bos_token_id
        return None if bos is None else int(bos)


def load_tokenizer(folder: Path | None) -> Tokenizer:
    """HFTokenizer when `folder` has tokenizer files, else ByteTokenizer (also for None)."""
    if folder is None:
        return ByteTokenizer()
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"tokenizer folder {folder} does not exist; pass the model folder, "
            "or none to use the byte tokenizer"
        )
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return HFTokenizer(folder)
    return ByteTokenizer()


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into text deltas (vLLM's prefix/read-offset method).

    It keeps the tail of the prompt and every generated id, and two offsets into them::

        ids:  [ prompt tail | generated ids ...................... ]
                ^prefix_offset           ^read_offset
                |-- decoded, emitted ----|-- not yet emitted ------|

    Invariant: `text` == what ids[:read_offset] added to the prompt's text, and
    ids[prefix_offset] starts a character. Each push decodes the window ids[prefix_offset:]
    and its prefix ids[prefix_offset:read_offset]; the delta is what the window adds. It is
    emitted only if it does not end in U+FFFD (an incomplete UTF-8 character waits for its
    next bytes); then prefix_offset takes read_offset and read_offset the end. Decoding in a
    window, not token by token, keeps what depends on context: a SentencePiece '▁w' decodes
    alone to "w" but after "Hello" to " w". Cost per push: two decodes of a window that is
    usually a few tokens long.

    For a tokenizer whose decode does not depend on context (byte-level ones), the deltas plus
    `flush` add up to `tokenizer.decode(generated ids)`. `flush` returns a tail still held back
    when generation ends (an incomplete character, or text that really ends in U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = DETOKENIZE_PROMPT_CONTEXT + UTF8_MAX_CONTINUATION_BYTES
        self._ids: list[int] = list(prompt_ids[-context:])
        self._prefix_offset = self._first_window_start()
        self._read_offset = len(self._ids)
        self._text = ""

    def _first_window_start(self) -> int:
        """DETOKENIZE_PROMPT_CONTEXT tokens before the end of the prompt, moved back by up to
        UTF8_MAX_CONTINUATION_BYTES tokens if that cuts a character in two.

        A window that starts inside a character decodes it as U+FFFD. With byte-fallback
        decoders (Llama 2) that is not confined to the cut character: the whole run of byte
        tokens, which can reach into the generated tokens, turns into U+FFFD.
        """
        end = len(self._ids)
        start = max(end - DETOKENIZE_PROMPT_CONTEXT, 0)
        for candidate in range(start, max(start - UTF8_MAX_CONTINUATION_BYTES, 0) - 1, -1):
            if REPLACEMENT_CHAR not in self._tokenizer.decode(self._ids[candidate:end]):
                return candidate
        return start  # the prompt itself holds U+FFFD or broken bytes: keep the default

    @property
    def text(self) -> str:
        """All text emitted so far (by `push` and `flush`)."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while held back)."""
        self._ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Return whatever is held back (decoded with U+FFFD for incomplete bytes); call once
        the sequence has finished."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""
        if hold_incomplete and new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta
