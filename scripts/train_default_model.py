"""Train Baton's default model, a small byte-level Llama shipped in `baton/default_model/`.

The model reads and writes UTF-8 bytes with `engine.tokenizer.ByteTokenizer` (ids 0..255 are
bytes, 256 BOS, 257 EOS), so it needs no tokenizer files. It is a plain `LlamaForCausalLM`
checkpoint: Baton's engine and transformers load the same folder.

Corpus: English prose already on a Debian/Ubuntu machine with Python, nothing downloaded.

  1. `/usr/share/common-licenses/*` (regular files, not symlinks, in name order): the GPL,
     LGPL, GFDL, Apache, MPL, Artistic, BSD and CC0 texts, each paragraph reflowed onto one line.
  2. The Zen of Python (the `this` module).
  3. Docstrings of the standard-library modules in `DOCSTRING_MODULES` (the module and its
     public classes, functions and methods, in name order), keeping only prose paragraphs:
     at least `MIN_PARAGRAPH_WORDS` words, nothing but letters and `,.;:'()-`, not indented
     (no code, no tables, no doctests). Each distinct paragraph is kept once, first seen first.

Every document is stored as BOS + its UTF-8 bytes + EOS and the documents are concatenated in
the order above. Every `VAL_EVERY`-th document is held out to measure validation loss. The
corpus depends only on the files in /usr/share/common-licenses and on the Python version (its
docstrings); the script prints the corpus's byte count and SHA-256 so that a rerun can be
checked against the README. With the corpus fixed, the run is deterministic on one machine
type: fixed seeds, one RNG for the batch offsets.

Training: AdamW, linear warmup then cosine decay, random windows of `--seq-len` bytes drawn
uniformly from the training stream (windows may cross document boundaries; every document
starts with BOS, as a served prompt does). The default run does 1750 steps at 0.45 to 0.8 s a
step on one core of a 2-core x86 CPU (AVX2): 14 to 21 minutes; the shipped weights took
1254 s on a machine shared with other jobs.

    python scripts/train_default_model.py                      # writes baton/default_model/

Output: `config.json`, `generation_config.json`, `model.safetensors` (written by transformers'
`save_pretrained`) and a `README.md` with the corpus hash, the steps and the final losses.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import re
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "baton" / "default_model"
LICENSES_DIR = Path("/usr/share/common-licenses")

BOS_ID = 256  # engine.tokenizer.ByteTokenizer's ids
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 320  # 259 ids used; rounded up to a multiple of 64

VAL_EVERY = 20  # every 20th document is held out
MIN_PARAGRAPH_WORDS = 6
PROSE_PARAGRAPH = re.compile(r"^[A-Za-z][A-Za-z ,.;:'()\-]*$")
README_WIDTH = 92
SAMPLE_PROMPTS = ("The ", "Once upon a time", "The quick brown fox", "KV caches are")

# Standard-library modules whose docstrings are read, in this order; all import without side
# effects.
_DOCSTRING_MODULE_NAMES = """
abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd
codecs collections colorsys compileall concurrent.futures configparser contextlib copy
cProfile csv dataclasses datetime decimal difflib dis doctest email email.message enum
filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass gettext glob graphlib
gzip hashlib heapq hmac html html.parser http.client http.cookies http.server imaplib
importlib inspect io ipaddress itertools json keyword linecache locale logging lzma mailbox
math mimetypes mmap multiprocessing netrc numbers operator optparse os os.path pathlib pdb
pickle pkgutil platform poplib pprint profile pstats py_compile pydoc queue quopri random re
reprlib sched secrets select selectors shelve shlex shutil signal smtplib socket
socketserver sqlite3 stat statistics string struct subprocess symtable sys sysconfig tarfile
tempfile textwrap threading time timeit token tokenize tomllib trace traceback tracemalloc
types typing unittest urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom
xml.etree.ElementTree xmlrpc.client zipfile zipimport zlib
"""
DOCSTRING_MODULES = tuple(_DOCSTRING_MODULE_NAMES.split())


# ---- corpus --------------------------------------------------------------------------------


def _reflow(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph; paragraphs stay separated by a blank line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        line = " ".join(block.split())
        if line:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def license_documents() -> list[str]:
    if not LICENSES_DIR.is_dir():
        raise SystemExit(f"{LICENSES_DIR} is missing; install Debian's base-files package")
    paths = sorted(p for p in LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink())
    return [_reflow(p.read_text(encoding="utf-8", errors="replace")) for p in paths]


def zen_document() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen on first import)
    return codecs.decode(sys.modules["this"].s, "rot13")


def _docstrings(module_name: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    objects: list[object] = [module]
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value):
            objects.append(value)
            objects.extend(
                member
                for member_name, member in sorted(vars(value).items())
                if not member_name.startswith("_")
                and (inspect.isfunction(member) or inspect.ismethoddescriptor(member))
            )
        elif inspect.isfunction(value) or inspect.isbuiltin(value):
            objects.append(value)
    return [doc for obj in objects if (doc := inspect.getdoc(obj))]


def docstring_documents() -> list[str]:
    """Distinct prose paragraphs of the docstrings, one document each, first seen first."""
    seen: set[str] = set()
    paragraphs = []
    for module_name in DOCSTRING_MODULES:
        for doc in _docstrings(module_name):
            for block in doc.split("\n\n"):
                lines = block.split("\n")
                if any(line.startswith(" ") for line in lines):
                    continue
                text = " ".join(line.strip() for line in lines)
                if len(text.split()) < MIN_PARAGRAPH_WORDS or not PROSE_PARAGRAPH.match(text):
                    continue
                if text not in seen:
                    seen.add(text)
                    paragraphs.append(text)
    return paragraphs


@dataclass(frozen=True)
class Corpus:
    train_ids: torch.Tensor  # [N] int64, BOS doc EOS BOS doc EOS ...
    val_ids: torch.Tensor  # [M] int64, the held-out documents, same layout
    num_documents: int
    num_bytes: int  # UTF-8 bytes of text, specials excluded
    sha256: str  # of the documents' bytes, each followed by a 0 byte


def build_corpus() -> Corpus:
    documents = [*license_documents(), zen_document(), *docstring_documents()]
    digest = hashlib.sha256()
    train: list[int] = []
    val: list[int] = []
    num_bytes = 0
    for i, doc in enumerate(documents):
        data = doc.encode("utf-8")
        digest.update(data + b"\0")
        num_bytes += len(data)
        target = val if i % VAL_EVERY == VAL_EVERY - 1 else train
        target.extend([BOS_ID, *data, EOS_ID])
    return Corpus(
        train_ids=torch.tensor(train, dtype=torch.int64),
        val_ids=torch.tensor(val, dtype=torch.int64),
        num_documents=len(documents),
        num_bytes=num_bytes,
        sha256=digest.hexdigest(),
    )


# ---- model and training --------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    weight_decay: float
    seed: int
    device: str
    threads: int
    save_dtype: str

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("--hidden-size must be a multiple of --heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("--heads must be a multiple of --kv-heads")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError("--save-dtype must be float32 or bfloat16")


@dataclass(frozen=True)
class TrainResult:
    num_parameters: int
    train_seconds: float
    train_loss: float  # nats/byte, exponential moving average over the last ~20 steps
    val_loss: float  # nats/byte on the held-out documents


def hf_config(cfg: TrainConfig) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to lr / 10 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(
    ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs [B, T] and next-byte targets [B, T]."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


def loss_nats_per_byte(
    model: transformers.LlamaForCausalLM, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = model(input_ids=inputs).logits  # [B, T, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def validation_loss(
    model: transformers.LlamaForCausalLM, val_ids: torch.Tensor, seq_len: int, device: str
) -> float:
    """Mean loss over consecutive, non-overlapping windows of the held-out documents."""
    model.eval()
    num_windows = (len(val_ids) - 1) // seq_len
    starts = range(0, num_windows * seq_len, seq_len)
    total = 0.0
    for chunk in range(0, num_windows, 64):
        rows = [val_ids[s : s + seq_len + 1] for s in list(starts)[chunk : chunk + 64]]
        windows = torch.stack(rows).to(device)
        total += loss_nats_per_byte(model, windows[:, :-1], windows[:, 1:]).item() * len(rows)
    model.train()
    return total / num_windows


def train(cfg: TrainConfig, corpus: Corpus) -> tuple[transformers.LlamaForCausalLM, TrainResult]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = transformers.LlamaForCausalLM(hf_config(cfg)).to(cfg.device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters; training {cfg.steps} steps", flush=True)
    start = time.perf_counter()
    smoothed = float("nan")
    log_every = max(1, cfg.steps // 40)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, targets = sample_batch(corpus.train_ids, cfg.batch_size, cfg.seq_len, generator)
        loss = loss_nats_per_byte(model, inputs.to(cfg.device), targets.to(cfg.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        if step % log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:5d}/{cfg.steps}  loss {value:.3f}  smoothed {smoothed:.3f}  "
                f"lr {lr_at(step, cfg):.2e}  {elapsed:.0f} s",
                flush=True,
            )
    train_s = time.perf_counter() - start
    val = validation_loss(model, corpus.val_ids, cfg.seq_len, cfg.device)
    print(
        f"done in {train_s:.0f} s: train loss {smoothed:.3f}, validation loss {val:.3f} nats/byte"
    )
    result = TrainResult(num_params, train_s, smoothed, val)
    return model.cpu().eval(), result


@torch.no_grad()
def greedy_samples(model: transformers.LlamaForCausalLM, max_new_tokens: int) -> dict[str, str]:
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([[BOS_ID, *prompt.encode("utf-8")]])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        new = [t for t in out[0, ids.shape[1] :].tolist() if t < 256]
        samples[prompt] = prompt + bytes(new).decode("utf-8", errors="replace")
    return samples


# ---- output --------------------------------------------------------------------------------


def write_readme(
    folder: Path, cfg: TrainConfig, corpus: Corpus, result: TrainResult, samples: dict[str, str]
) -> None:
    tokens_m = cfg.steps * cfg.batch_size * cfg.seq_len / 1e6
    paragraphs = [
        f"A byte-level Llama ({result.num_parameters / 1e6:.2f}M parameters: hidden "
        f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"{cfg.num_key_value_heads} KV heads, MLP {cfg.intermediate_size}, vocabulary "
        f"{VOCAB_SIZE}) trained by `scripts/train_default_model.py` so that `baton run` prints "
        "English-like text with nothing downloaded. It is a standard `LlamaForCausalLM` "
        "checkpoint without tokenizer files: Baton reads it with `ByteTokenizer` (ids 0..255 "
        f"are bytes, {BOS_ID} BOS, {EOS_ID} EOS) and transformers loads it too. It writes "
        "license- and documentation-flavoured English and knows nothing else.",
        "Corpus: `/usr/share/common-licenses/*`, the Zen of Python and the prose paragraphs of "
        f"the docstrings of {len(DOCSTRING_MODULES)} standard-library modules (Python "
        f"{sys.version_info.major}.{sys.version_info.minor}); {corpus.num_documents} "
        f"documents, {corpus.num_bytes} bytes, SHA-256 `{corpus.sha256}`. Every "
        f"{VAL_EVERY}th document is held out.",
        f"Training: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes "
        f"({tokens_m:.1f}M bytes), AdamW lr {cfg.lr} (warmup {cfg.warmup_steps} steps, cosine "
        f"to lr/10), weight decay {cfg.weight_decay}, seed {cfg.seed}, on {cfg.device} with "
        f"{cfg.threads} thread(s) in {result.train_seconds:.0f} s. Final loss: train "
        f"{result.train_loss:.3f}, held-out {result.val_loss:.3f} nats/byte. Weights saved in "
        f"{cfg.save_dtype}.",
    ]
    wrapped = [textwrap.fill(text, README_WIDTH, break_on_hyphens=False) for text in paragraphs]
    sample_lines = "\n".join(f"    {text!r}" for text in samples.values())
    settings = json.dumps(asdict(cfg), indent=2)
    (folder / "README.md").write_text(
        "# Baton's default model\n\n"
        + "\n\n".join(wrapped)
        + "\n\nGreedy continuations (transformers `generate`):\n\n"
        + sample_lines
        + "\n\nReproduce (the corpus hash above is printed first, to compare):\n\n"
        + "    python scripts/train_default_model.py\n\n"
        + f"Training settings:\n\n```json\n{settings}\n```\n"
    )


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=1750)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; 1 is steady on a shared machine (2 OpenMP threads that lose a "
        "core to another process spin and run several times slower) and keeps runs "
        "bitwise repeatable",
    )
    p.add_argument("--save-dtype", default="float32")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        steps=a.steps,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        save_dtype=a.save_dtype,
    )
    return cfg, a.output


def main(argv: list[str] | None = None) -> int:
    cfg, output = parse_args(argv)
    corpus = build_corpus()
    print(
        f"corpus: {corpus.num_documents} documents, {corpus.num_bytes} bytes, "
        f"sha256 {corpus.sha256}; {len(corpus.train_ids)} train / {len(corpus.val_ids)} "
        "held-out ids",
        flush=True,
    )
    model, result = train(cfg, corpus)
    model = model.to(getattr(torch, cfg.save_dtype))
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    for path in output.iterdir():
        path.chmod(0o644)  # safetensors writes its file owner-only
    samples = greedy_samples(model.float(), max_new_tokens=80)
    for text in samples.values():
        print(repr(text))
    write_readme(output, cfg, corpus, result, samples)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
