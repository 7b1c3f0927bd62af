"""Tokenizers, CLIP blocks (App. B), the adaptation cache and batches (Sec. 2.3), task data (Sec. 3), SVG charts."""
import contextlib
import csv
import gzip
import hashlib
import html
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import BPE

# ----------------------------------------------------------------------------- tokenizers and CLIP blocks (App. B)

CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_MERGES = 49152 - 256 - 2  # merges CLIP uses from the 16e6 list (48,894); vocabulary 512 + merges + 2 = 49,408
# what OpenAI CLIP's ftfy.fix_text changes in ordinary text, as one table (the README's data.py section)
CLIP_FIXES = str.maketrans({
    **dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'"), **dict.fromkeys("\u201c\u201d\u201e\u201f", '"'),
    **{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}, "\u3000": " ",
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb06": "st",
    **dict.fromkeys(map(chr, [*range(9), 11, *range(14, 32), 127, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)]))})


def download_hint(path, what: str) -> str:
    """The command that fetches a missing file: `--toy` under a toy folder (data/toy, ckpt/bert-toy), else `what`."""
    toy = any(part == "toy" or part.endswith("-toy") for part in Path(path).parts)
    return f"run `python download.py {'--toy' if toy else what}`"


def checkpoint_dir(name, data_root="data") -> Path:
    """A --encoder / --clip value: a name under DATA/ckpt/ or a hub-layout directory (e.g. runs/<run>/xdbert)."""
    where = Path(data_root) / "ckpt" / str(name)
    for path in (where, Path(name)):
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"no checkpoint {str(name)!r}: neither {where} nor {name} holds a config.json; "
                            f"{download_hint(where, name)}, or give a directory adapt.py wrote (runs/<run>/xdbert)")


def _plain(tok: Tokenizer) -> Tokenizer:
    """Padding and truncation off (a shipped tokenizer.json may pad to 128); a "[SEP]" in a text stays text."""
    tok.no_padding()
    tok.no_truncation()
    tok.encode_special_tokens = True
    return tok


def bert_tokenizer(ckpt_dir) -> Tokenizer:
    """BERT/ELECTRA uncased WordPiece from the checkpoint's tokenizer.json, else from its vocab.txt."""
    ckpt = Path(ckpt_dir)
    if (ckpt / "tokenizer.json").is_file():
        return _plain(Tokenizer.from_file(str(ckpt / "tokenizer.json")))
    if not (ckpt / "vocab.txt").is_file():
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {ckpt}: {download_hint(ckpt, ckpt.name)}")
    return _plain(Tokenizer.from_str(BertWordPieceTokenizer(str(ckpt / "vocab.txt"), lowercase=True).to_str()))


def clip_tokenizer(ckpt_dir) -> Tokenizer:
    """CLIP's byte-level BPE from the checkpoint's tokenizer.json."""
    path = Path(ckpt_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no CLIP tokenizer.json in {path.parent}: {download_hint(path, path.parent.name)}")
    return _plain(Tokenizer.from_file(str(path)))


def clip_tokenizer_json_from_bpe(bpe_txt_gz, out_json) -> None:
    """CLIP's tokenizer.json from open_clip's bpe_simple_vocab_16e6.txt.gz, as OpenAI's simple_tokenizer builds it."""
    with gzip.open(bpe_txt_gz, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:CLIP_MERGES + 1]]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_START, CLIP_END]
    tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", unk_token=CLIP_END, fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_END, len(tokens) - 1), (CLIP_START, len(tokens) - 2), trim_offsets=False, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([CLIP_START, CLIP_END])
    tok.save(f"{out_json}.tmp")
    os.replace(f"{out_json}.tmp", out_json)


def clip_encode(clip_tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """CLIP BPE ids of each text (no start/end), after CLIP's cleaning (CLIP_FIXES, html.unescape twice)."""
    cleaned = [html.unescape(html.unescape(t.translate(CLIP_FIXES))).strip() for t in texts]
    return [e.ids for e in clip_tok.encode_batch_fast(cleaned, add_special_tokens=False)]


CLIP_CONTEXT = 77                     # CLIP's maximum sequence length
CLIP_BLOCK_TOKENS = CLIP_CONTEXT - 2  # BPE tokens between <|startoftext|> and <|endoftext|>
ADAPT_BLOCKS = 9                      # App. B: 9 x 77 = 693 CLIP positions per 512-token window
SENTENCE_BLOCKS = 2                   # App. B: 2 blocks per finetuning sentence


def clip_special_ids(clip_tok: Tokenizer) -> tuple[int, int]:
    """(<|startoftext|>, <|endoftext|>) ids, read from the tokenizer (the toy kit's vocabulary has its own)."""
    ids = clip_tok.token_to_id(CLIP_START), clip_tok.token_to_id(CLIP_END)
    if None in ids:
        raise ValueError(f"the CLIP tokenizer lacks {CLIP_START} or {CLIP_END}: use a CLIP tokenizer.json")
    return ids


def _pack_blocks(bpe: Sequence[int], n_blocks: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """App. B: blocks of start + up to 75 ids + end, zero-padded to 77 -> ids (n, 77), lengths (n,), any cut off."""
    ids = np.zeros((n_blocks, CLIP_CONTEXT), np.int64)  # (n, 77)
    lengths = np.zeros(n_blocks, np.int64)              # (n,)
    kept = bpe[:n_blocks * CLIP_BLOCK_TOKENS]
    for b in range(max(1, math.ceil(len(kept) / CLIP_BLOCK_TOKENS))):
        piece = kept[b * CLIP_BLOCK_TOKENS:(b + 1) * CLIP_BLOCK_TOKENS]
        ids[b, 0], ids[b, 1:len(piece) + 1], ids[b, len(piece) + 1] = start, piece, end
        lengths[b] = len(piece) + 2
    return ids, lengths, len(bpe) > len(kept)


def _block_mask(lengths: np.ndarray, width: int = CLIP_CONTEXT) -> np.ndarray:
    """(..., n) real lengths -> (..., n, width) int64 mask (CLIP's id 0 is a real token: padding is known by length)."""
    return (np.arange(width) < lengths[..., None]).astype(np.int64)


# ----------------------------------------------------------------------------- the adaptation cache (App. B, C.1)

CACHE_VERSION = 2  # 2: WikiText line rule, CLIP text cleaning
CHUNK_CHARS = 1 << 20  # text tokenized per batch: bounds the builder's memory whatever the corpus size


# the ids the adaptation batches need; random_low: the lowest id a random MLM replacement may take (999 for BERT)
SpecialIds = namedtuple("SpecialIds", "cls sep pad mask random_low vocab_size clip_start clip_end")


def first_plain_token(bert_tok: Tokenizer) -> int:
    """The id after the last bracketed vocabulary entry ([PAD], [unused993], [MASK], ...): 999 for bert-base-uncased."""
    return 1 + max(i for t, i in bert_tok.get_vocab().items() if re.fullmatch(r"\[[^\[\]]+\]", t))


def _utf8_lines(path, fix: str) -> Iterator[str]:
    """A file's lines (ends kept, split at \\n only, no leading BOM); a byte that is not UTF-8 names its line, `fix`."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: byte {raw[e.start]:#04x} is not UTF-8: {fix}") from None


def wikitext_line(line: str) -> bool:
    """App. C.1 (as Tan and Bansal 2020): not a heading (" = Title = ") and at least 5 words."""
    return not line.startswith(" = ") and len(line.strip().split(" ")) >= 5


def line_chunks(path, chunk_chars: int = CHUNK_CHARS, keep: Callable[[str], bool] = wikitext_line):
    """Stream a raw-text corpus as lists of the non-blank lines that `keep` accepts, about chunk_chars characters."""
    lines, size = [], 0
    for line in _utf8_lines(path, "convert the corpus to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"):
        if line.strip() and keep(line):
            lines.append(line.rstrip("\r\n"))
            size += len(line)
        if size >= chunk_chars:
            yield lines
            lines, size = [], 0
    if lines:
        yield lines


def build_cache(corpus_path, bert_dir, clip_dir, cache_root, seq_len: int = 512, n_blocks: int = ADAPT_BLOCKS,
                chunk_chars: int = CHUNK_CHARS, log: Callable[[str], None] = print, all_lines: bool = False) -> str:
    """App. B, C.1: the cache of a corpus (WikiText's lines unless all_lines), reused while its key holds -> its dir."""
    corpus = Path(corpus_path)
    if not corpus.is_file():
        raise FileNotFoundError(f"no corpus at {corpus}: {download_hint(corpus, 'wikitext')}")
    bert_tok, clip_tok = bert_tokenizer(bert_dir), clip_tokenizer(clip_dir)
    if max(bert_tok.get_vocab_size(), clip_tok.get_vocab_size()) > 1 << 16:
        raise ValueError("the cache stores uint16 ids: a vocabulary has more than 65,536 entries")
    sha256 = lambda text: hashlib.sha256(text.encode()).hexdigest()
    with open(corpus, "rb") as f:
        key = {"version": CACHE_VERSION, "source_bytes": corpus.stat().st_size,
               "source_sha256": hashlib.file_digest(f, "sha256").hexdigest(),
               "lines": "all" if all_lines else "wikitext", "bert_tokenizer_sha256": sha256(bert_tok.to_str()),
               "clip_tokenizer_sha256": sha256(clip_tok.to_str()), "seq_len": seq_len, "n_blocks": n_blocks}
    tokenizers_id = sha256(key["bert_tokenizer_sha256"] + key["clip_tokenizer_sha256"])[:10]
    cache_dir = Path(cache_root) / f"{corpus.name}-{seq_len}x{n_blocks}-{tokenizers_id}{'-all' * all_lines}"
    manifest = cache_dir / "manifest.json"
    built_key = lambda: json.loads(manifest.read_text())["key"] if manifest.is_file() else None  # of the published one
    old = built_key()
    if old == key:
        log(f"reusing the adaptation cache {cache_dir}")
        return str(cache_dir)
    log(f"rebuilding the adaptation cache {cache_dir}: {', '.join(k for k in key if old.get(k) != key[k])} changed"
        if old else f"building the adaptation cache {cache_dir} from {corpus}")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory(".tmp", f"{cache_dir.name}.{os.getpid()}.", cache_dir.parent) as tmp:
        chunks = line_chunks(corpus, chunk_chars, (lambda line: True) if all_lines else wikitext_line)
        built = {"key": key, **_write_windows(corpus, Path(tmp), bert_tok, clip_tok, seq_len, n_blocks, chunks),
                 "build_seconds": round(time.time() - start, 1)}
        Path(tmp, "manifest.json").write_text(json.dumps(built, indent=1))
        if built_key() != key:
            shutil.rmtree(cache_dir, ignore_errors=True)
            try:
                os.replace(tmp, cache_dir)
            except OSError:  # a concurrent job published the same cache between the two lines above
                if built_key() != key:
                    raise
    log(f"{built['windows']} windows, {100 * built['clip_truncated_fraction']:.2f}% truncated in CLIP blocks")
    return str(cache_dir)


def _write_windows(corpus: Path, out: Path, bert_tok: Tokenizer, clip_tok: Tokenizer, seq_len: int, n_blocks: int,
                   chunks: Iterator[list[str]]) -> dict:
    """App. B: [CLS] + seq_len - 2 + [SEP] windows of the WordPiece stream (the last, incomplete one dropped) into
    bert_ids (N, seq_len), their text's CLIP blocks into clip_ids (N, n_blocks, 77) and clip_lengths (N, n_blocks)."""
    named = {name: bert_tok.token_to_id(f"[{name.upper()}]") for name in ("cls", "sep", "pad", "mask")}
    if None in named.values():
        raise ValueError("the BERT tokenizer lacks one of [CLS] [SEP] [PAD] [MASK]: use a BERT/ELECTRA tokenizer.json")
    start, end = clip_special_ids(clip_tok)
    sp = SpecialIds(*named.values(), first_plain_token(bert_tok), bert_tok.get_vocab_size(), start, end)
    body_len, clip_tokens = seq_len - 2, []  # clip_tokens: each window's BPE length
    text, ids, spans = "", np.zeros(0, np.int64), np.zeros((0, 2), np.int64)  # the tail carried from the last chunk
    with open(out / "bert_ids", "wb") as f_bert, open(out / "clip_ids", "wb") as f_clip, \
            open(out / "clip_lengths", "wb") as f_len:
        for lines in chunks:
            encodings = bert_tok.encode_batch(lines, add_special_tokens=False)  # parallel over all cores
            counts = [len(e.ids) for e in encodings]
            starts = len(text) + 1 + np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])  # each line in the text
            new_spans = np.array([s for e in encodings for s in e.offsets], np.int64).reshape(-1, 2)
            text += "\n" + "\n".join(lines)
            ids = np.concatenate([ids, np.array([i for e in encodings for i in e.ids], np.int64)])
            spans = np.concatenate([spans, new_spans + np.repeat(starts, counts)[:, None]])  # (tokens, 2) into text
            n = len(ids) // body_len * body_len
            body = ids[:n].reshape(-1, body_len)
            f_bert.write(np.pad(body, ((0, 0), (1, 1)), constant_values=(sp.cls, sp.sep)).astype(np.uint16).tobytes())
            texts = [text[s:e] for s, e in zip(spans[0:n:body_len, 0], spans[body_len - 1:n:body_len, 1])]
            for bpe in clip_encode(clip_tok, texts):
                blocks, lengths, _ = _pack_blocks(bpe, n_blocks, start, end)  # (n_blocks, 77), (n_blocks,)
                f_clip.write(blocks.astype(np.uint16).tobytes())
                f_len.write(lengths.astype(np.uint8).tobytes())
                clip_tokens.append(len(bpe))
            cut = spans[n, 0] if len(ids) > n else len(text)
            text, ids, spans = text[cut:], ids[n:], spans[n:] - cut
    if not clip_tokens:
        raise ValueError(f"{corpus} has fewer than {body_len} WordPiece tokens: no adaptation window fits")
    windows, truncated = len(clip_tokens), sum(n > n_blocks * CLIP_BLOCK_TOKENS for n in clip_tokens)
    return {"windows": windows, "bert_tokens": windows * body_len + len(ids), "dropped_tail_tokens": len(ids),
            "clip_tokens_mean": round(sum(clip_tokens) / windows, 2), "clip_tokens_max": max(clip_tokens),
            "clip_truncated_windows": truncated, "clip_truncated_fraction": truncated / windows,
            "special_ids": sp._asdict()}


# ----------------------------------------------------------------------------- adaptation batches (Sec. 2.3)

IGNORE = -100     # target of an unused prediction slot: no loss is computed there
MASK_PROB = 0.15  # Sec. 2.3.1, 2.3.3: the share of real tokens that MLM masks and CLIPTC predicts (BERT's rate)
MATCH_PROB = 0.5  # Sec. 2.3.2: the share of MATCH pairs whose CLIP text comes from another window


def prediction_slots(n: int, prob: float) -> int:
    """How many of n candidates are predicted: round(prob * n), at least 1 (of the most: the fixed slot count)."""
    return max(1, round(prob * n))


def _predict(real: np.ndarray, ids: np.ndarray, rng: np.random.Generator, slots: int):
    """MASK_PROB of the real positions of the flat ids, drawn without replacement (Devlin et al. 2019) -> them, their
    sorted positions and ids as targets, both padded to (slots,) (targets with IGNORE)."""
    chosen = candidates = np.flatnonzero(real)
    if len(candidates):  # the same draws as rng.choice(candidates, k, replace=False), without its array handling
        chosen = candidates[rng.choice(len(candidates), prediction_slots(len(candidates), MASK_PROB), replace=False)]
    positions, targets = np.zeros(slots, np.int64), np.full(slots, IGNORE, np.int64)
    positions[:len(chosen)] = np.sort(chosen)
    targets[:len(chosen)] = ids[positions[:len(chosen)]]
    return chosen, positions, targets


def clip_blocks_to_run(clip_mask: torch.Tensor) -> torch.Tensor:
    """Indices (N,) of the (B, n, 77) mask's blocks CLIP-T runs on: those with text, topped up to a multiple of B."""
    used = clip_mask[..., 0].flatten().bool()  # (B*n,): a block's <|startoftext|> is real unless it is all padding
    B = clip_mask.shape[0]
    return torch.argsort((~used).byte(), stable=True)[:B * -(-int(used.sum()) // B)]


class AdaptationData:
    """The memmapped adaptation cache; its Sec. 2.3 batches depend on (seed, epoch, window index) alone."""

    def __init__(self, cache_dir, match_prob: float = MATCH_PROB):
        cache = Path(cache_dir)
        if not (cache / "manifest.json").is_file():
            raise FileNotFoundError(f"no adaptation cache at {cache}: adapt.py builds it with data.build_cache")
        self.manifest = json.loads((cache / "manifest.json").read_text())
        self.special = SpecialIds(**self.manifest["special_ids"])
        n, key = self.manifest["windows"], self.manifest["key"]
        seq_len, n_blocks = key["seq_len"], key["n_blocks"]
        if n < 2 and match_prob > 0:
            raise ValueError(f"MATCH needs at least 2 windows and {cache} holds {n}: use a larger corpus")
        self.bert_ids = np.memmap(cache / "bert_ids", np.uint16, "r", shape=(n, seq_len))
        self.clip_ids = np.memmap(cache / "clip_ids", np.uint16, "r", shape=(n, n_blocks, CLIP_CONTEXT))
        self.clip_lengths = np.memmap(cache / "clip_lengths", np.uint8, "r", shape=(n, n_blocks))
        self.clip_width, self.match_prob = max(1, int(self.clip_lengths.max(initial=0))), match_prob
        self.mlm_slots = prediction_slots(seq_len - 2, MASK_PROB)
        self.cliptc_slots = prediction_slots(n_blocks * CLIP_BLOCK_TOKENS, MASK_PROB)

    def __len__(self) -> int:
        return len(self.bert_ids)

    def example(self, index: int, seed: int, epoch: int) -> dict[str, np.ndarray]:
        """One window's inputs and targets (Sec. 2.3); its random draws depend on (seed, epoch, index) only."""
        rng, sp = np.random.default_rng((seed, epoch, index)), self.special
        # MATCH (2.3.2): with match_prob the CLIP input comes from another random window (label 0), else its own (1)
        partner, match = index, 1
        if rng.random() < self.match_prob:
            other = int(rng.integers(len(self) - 1))
            partner, match = other + (other >= index), 0
        # MLM (2.3.1): 15% of the real tokens: 80% [MASK], 10% a random plain (not [..]) token, 10% kept
        ids = np.array(self.bert_ids[index], np.int64)  # (T,), a plain array (faster than the memmap's views)
        real = (ids != sp.cls) & (ids != sp.sep) & (ids != sp.pad)
        chosen, mlm_positions, mlm_targets = _predict(real, ids, rng, self.mlm_slots)
        input_ids, action = ids.copy(), rng.random(len(chosen))
        input_ids[chosen[action < 0.8]] = sp.mask
        swap = chosen[(action >= 0.8) & (action < 0.9)]
        input_ids[swap] = rng.integers(sp.random_low, sp.vocab_size, len(swap))
        # CLIPTC (2.3.3): 15% of the real CLIP tokens (not start, end, padding) are targets; the input stays
        W = self.clip_width
        clip_ids = np.array(self.clip_ids[partner, :, :W], np.int64)  # (n, W)
        clip_mask = _block_mask(np.array(self.clip_lengths[partner], np.int64), W)  # (n, W)
        real = (clip_mask == 1) & (clip_ids != sp.clip_start) & (clip_ids != sp.clip_end)
        _, cliptc_positions, cliptc_targets = _predict(real.reshape(-1), clip_ids.reshape(-1), rng, self.cliptc_slots)
        return {"input_ids": input_ids, "token_type_ids": np.zeros(len(ids), np.int64), "mlm_positions": mlm_positions,
                "mlm_targets": mlm_targets, "clip_ids": clip_ids, "clip_mask": clip_mask,
                "cliptc_positions": cliptc_positions, "cliptc_targets": cliptc_targets, "match_labels": np.int64(match)}

    def batch(self, indices: Sequence[int], seed: int, epoch: int) -> dict[str, torch.Tensor]:
        """The examples stacked (B, ...), int64, and clip_blocks (N,); windows are never padded: no attention_mask."""
        examples = [self.example(int(i), seed, epoch) for i in indices]
        out = {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
        return out | {"clip_blocks": clip_blocks_to_run(out["clip_mask"])}


# ----------------------------------------------------------------------------- finetuning tasks and features (Sec. 3)

GLUE_SPLITS = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
MNLI_SPLITS = {s: f"{s}.tsv" for s in ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")}
MNLI_SPLITS["test_ax"] = "../AX/AX.tsv"  # GLUE's diagnostic set (AX), predicted by the MNLI model
COLA_COLUMNS = ("source", "label", "orig", "sentence")  # CoLA's train.tsv and dev.tsv have no header row
READ_DEV_FRACTION, READ_SPLIT_SEED = 0.1, 0             # CommonLit's test labels are private: a fixed dev split
SWAG_ENDINGS = ("ending0", "ending1", "ending2", "ending3")


@dataclass(frozen=True)
class Example:
    """One task example as read from the official files."""
    text_a: str
    text_b: str | None = None         # second sentence of a pair task
    label: int | float | None = None  # class index, score, or the right ending; None where labels are hidden
    endings: tuple[str, ...] = ()     # SWAG: the 4 choices, each sent2 + " " + ending_k
    guid: str = ""                    # the row's index/id in the file (row number where there is none)


@dataclass(frozen=True)
class Task:
    """A finetuning task; label_names as the official files (and GLUE submissions) write them, in class order."""
    name: str
    kind: str                       # "classification" | "regression" | "choice"
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]        # "accuracy", "f1", "mcc", "pearson", "spearman", "rmse"
    folder: str                     # under the data root, whose first part is what download.py fetches
    columns: tuple[str, str | None, str]  # the text_a, text_b and label columns
    splits: dict[str, str] = field(default_factory=lambda: dict(GLUE_SPLITS))  # split -> file name
    glue_dir: str | None = None     # GLUE folder name (CoLA, SST-2, ...), None for SWAG and READ
    more_columns: tuple[str, ...] = ()  # other columns read: the row's id, SWAG's endings

    @property
    def num_labels(self) -> int:
        return {"classification": len(self.label_names), "regression": 1, "choice": 4}[self.kind]


def _glue(name, glue_dir, label_names, metrics, columns, **kw) -> Task:
    kind = "classification" if label_names else "regression"
    return Task(name, kind, label_names, metrics, f"glue/{glue_dir}", columns, glue_dir=glue_dir, **kw)


BINARY, ENTAIL = ("0", "1"), ("entailment", "not_entailment")
TASKS: dict[str, Task] = {t.name: t for t in [
    _glue("rte", "RTE", ENTAIL, ("accuracy",), ("sentence1", "sentence2", "label")),
    _glue("mrpc", "MRPC", BINARY, ("f1", "accuracy"), ("#1 String", "#2 String", "Quality")),
    _glue("stsb", "STS-B", (), ("pearson", "spearman"), ("sentence1", "sentence2", "score")),
    _glue("cola", "CoLA", BINARY, ("mcc",), ("sentence", None, "label")),
    _glue("sst2", "SST-2", BINARY, ("accuracy",), ("sentence", None, "label")),
    _glue("qnli", "QNLI", ENTAIL, ("accuracy",), ("question", "sentence", "label")),
    _glue("qqp", "QQP", BINARY, ("f1", "accuracy"), ("question1", "question2", "is_duplicate")),
    _glue("mnli", "MNLI", ("entailment", "neutral", "contradiction"), ("accuracy",),
          ("sentence1", "sentence2", "gold_label"), splits=MNLI_SPLITS),
    _glue("wnli", "WNLI", BINARY, ("accuracy",), ("sentence1", "sentence2", "label")),
    Task("swag", "choice", ("0", "1", "2", "3"), ("accuracy",), "swag", ("sent1", "sent2", "label"),
         {"train": "train.csv", "dev": "val.csv", "test": "test.csv"}, more_columns=("", *SWAG_ENDINGS)),
    Task("read", "regression", (), ("rmse",), "read", ("excerpt", None, "target"),
         {"train": "train.csv", "dev": "train.csv"}, more_columns=("id",)),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def read_task(name: str, split: str, data_root="data", log: Callable[[str], None] = print) -> list[Example]:
    """The examples of one split (test splits: label None); SWAG's choice k is sent2 + " " + ending_k, as run_swag.
    GLUE's unquoted TSVs skip rows of the wrong length (a few in QQP, MNLI); a CSV (SWAG, READ) stops at one."""
    task = get_task(name)
    if split not in task.splits:
        why = " (CommonLit's test labels are private)" if task.name == "read" else ""
        raise ValueError(f"{task.name} has no split {split!r}{why}: choose one of {', '.join(task.splits)}")
    path = Path(data_root) / task.folder / task.splits[split]
    hint, labelled = download_hint(path, task.folder.split("/")[0]), not split.startswith("test")
    if not path.is_file():
        raise FileNotFoundError(f"no {task.name} {split} data at {path}: {hint}")
    empty = ValueError(f"{path} holds no {task.name} examples (empty, header only or every line malformed): {hint}")
    lines = _utf8_lines(path, f"save the file as UTF-8, or {hint}")
    if task.glue_dir:
        table = ((n, line.rstrip("\r\n").split("\t")) for n, line in enumerate(lines, start=1))
    else:
        reader = csv.reader(lines)
        table = ((reader.line_num, fields) for fields in reader if fields)
    header = list(COLA_COLUMNS) if task.name == "cola" and split != "test" else next(table, (0, []))[1]
    if not any(header):
        raise empty
    text_a, text_b, label = task.columns
    wanted = [text_a, text_b, *task.more_columns, label if labelled else None]
    if missing := [c for c in wanted if c is not None and c not in header]:
        raise ValueError(f"{path}: no column {missing[0]!r} in its header ({', '.join(map(repr, header))}): it is "
                         f"not the official {task.name} {split} file; {hint}")
    rows, skipped = [], 0
    for n, fields in table:
        if len(fields) == len(header):
            rows.append((n, dict(zip(header, fields))))
        elif task.glue_dir:
            skipped += 1
        else:
            raise ValueError(f"{path}:{n}: the row does not have the header's {len(header)} fields: the file is cut "
                             f"or damaged; {hint}")
    if skipped:
        log(f"{path}: skipped {skipped} malformed lines")
    if task.name == "read":  # CommonLit's test labels are private: a seeded READ_DEV_FRACTION of train.csv is dev
        order = np.random.default_rng(READ_SPLIT_SEED).permutation(len(rows))
        dev = set(order[:round(READ_DEV_FRACTION * len(rows))])
        rows = [row for i, row in enumerate(rows) if (i in dev) == (split == "dev")]
    regression, examples = task.kind == "regression", []
    for i, (n, row) in enumerate(rows):
        y = None
        if labelled:  # a finite score, or a class index by label name
            with contextlib.suppress(ValueError):
                y = float(row[label]) if regression else task.label_names.index(row[label])
            if y is None or not math.isfinite(y):
                want = "a number" if regression else f"one of {', '.join(task.label_names)}"
                raise ValueError(f"{path}:{n}: {'score' if regression else 'label'} {row[label]!r} is not {want} "
                                 f"for {task.name}")
        guid = next((row[k] for k in ("index", "id", "") if k in row), str(i))
        endings = tuple(f"{row[text_b]} {row[e]}" for e in SWAG_ENDINGS) if task.kind == "choice" else ()
        examples.append(Example(row[text_a], row[text_b] if text_b and not endings else None, y, endings, guid))
    if not examples:
        raise empty
    return examples


def encode(examples: list[Example], name: str, bert_tok: Tokenizer | None, max_len: int = 128,
           clip_tok: Tokenizer | None = None) -> dict[str, torch.Tensor]:
    """Sec. 2.4: input_ids, attention_mask, token_type_ids (N, max_len) of [CLS] a [SEP] (b [SEP]), labels (N,) where
    known; with clip_tok clip_ids, clip_mask (N, 2 per sentence, 77) (App. B, C.3). SWAG (N, 4, ...), one per choice."""
    if bert_tok is None and clip_tok is None:
        raise ValueError("encode needs a BERT tokenizer, a CLIP tokenizer or both")
    task = get_task(name)
    pairs = [(ex.text_a, b) for ex in examples for b in ex.endings or [ex.text_b]]  # SWAG: one pair per ending
    features = {}
    if bert_tok is not None:
        tok = _plain(Tokenizer.from_str(bert_tok.to_str()))  # a copy
        tok.enable_truncation(max_len)
        tok.enable_padding(length=max_len, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
        encodings = tok.encode_batch_fast([a if b is None else (a, b) for a, b in pairs])
        for key, attr in ("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"):
            features[key] = np.array([getattr(e, attr) for e in encodings], np.int64).reshape(-1, max_len)  # (M, T)
    if clip_tok is not None:  # App. B: 2 CLIP blocks per sentence, a pair's sentences never sharing one
        start, end = clip_special_ids(clip_tok)
        texts = [t for pair in pairs for t in pair if t is not None]
        ids, lengths, _ = zip(*[_pack_blocks(bpe, SENTENCE_BLOCKS, start, end) for bpe in clip_encode(clip_tok, texts)])
        features["clip_ids"] = np.stack(ids).reshape(len(pairs), -1, CLIP_CONTEXT)  # (M, 2 per sentence, 77)
        features["clip_mask"] = _block_mask(np.stack(lengths).reshape(len(pairs), -1))
    shape = (len(examples), -1) if task.kind == "choice" else (len(examples),)
    out = {k: torch.from_numpy(v.reshape(*shape, *v.shape[1:])) for k, v in features.items()}
    labels = [ex.label for ex in examples]
    if any(label is not None for label in labels):
        if None in labels:
            raise ValueError(f"some {task.name} examples have labels and some do not: encode one split at a time")
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if task.kind == "regression" else torch.int64)
    return out


# ----------------------------------------------------------------------------- SVG charts (loss curves, Fig. 4)

SVG_WIDTH, SVG_HEIGHT = 640, 400
SVG_LEFT, SVG_RIGHT, SVG_TOP, SVG_BOTTOM = 70, 490, 40, 350   # the plot area in pixels; the legend sits to its right
SVG_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About n round tick values (steps of 1, 2 or 5 x 10^k) from at most lo to at least hi."""
    if hi <= lo:
        lo, hi = lo - 0.5, lo + 0.5
    unit = 10.0 ** math.floor(math.log10((hi - lo) / n))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= (hi - lo) / n)
    return np.arange(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1) * step


def _axis(ticks: np.ndarray, start: float, end: float) -> Callable[[float], float]:
    """Data value -> pixel, with ticks[0] at start and ticks[-1] at end."""
    return lambda v: start + (v - ticks[0]) * (end - start) / (ticks[-1] - ticks[0])


def _text(x: float, y: float, text: str, anchor: str = "middle", more: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{more}>{html.escape(text)}</text>'


def _svg(title: str, x_label: str, y_label: str, y_ticks: np.ndarray, x_ticks: list[tuple[float, str]],
         names: list[str], body: list[str]) -> str:
    """The frame both charts share: title, axes with their ticks and labels, the plotted body, a legend."""
    sy, mid, y_mid = _axis(y_ticks, SVG_BOTTOM, SVG_TOP), (SVG_LEFT + SVG_RIGHT) / 2, (SVG_TOP + SVG_BOTTOM) / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}" '
             f'font-family="sans-serif" font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
             _text(mid, 22, title, more=' font-size="15"'), _text(mid, SVG_BOTTOM + 36, x_label),
             _text(18, y_mid, y_label, more=f' transform="rotate(-90 18 {y_mid})"'),
             f'<path class="axes" d="M{SVG_LEFT},{SVG_TOP}V{SVG_BOTTOM}H{SVG_RIGHT}" fill="none" stroke="black"/>']
    for t in y_ticks:
        parts += [f'<path d="M{SVG_LEFT - 4},{sy(t):.1f}H{SVG_RIGHT}" stroke="#ddd"/>',
                  _text(SVG_LEFT - 7, sy(t) + 4, f"{t:.6g}", "end")]
    parts += [_text(x, SVG_BOTTOM + 16, label) for x, label in x_ticks] + body + ['<g class="legend">']
    parts += [f'<g class="entry"><rect x="{SVG_RIGHT + 15}" y="{SVG_TOP + 20 * i}" width="12" height="12" fill="'
              f'{SVG_COLOURS[i % len(SVG_COLOURS)]}"/>{_text(SVG_RIGHT + 33, SVG_TOP + 10 + 20 * i, name, "start")}</g>'
              for i, name in enumerate(names)]
    return "\n".join(parts + ["</g>", "</svg>"]) + "\n"


def svg_lines(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str) -> str:
    """A line chart as standalone SVG: one polyline per series of (x, y) points (e.g. a loss curve per run)."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"svg_lines({title!r}) got no points: give each series a list of (x, y) pairs")
    x_ticks, y_ticks = (nice_ticks(min(c), max(c)) for c in zip(*points))
    sx, sy = _axis(x_ticks, SVG_LEFT, SVG_RIGHT), _axis(y_ticks, SVG_BOTTOM, SVG_TOP)
    pixels = {name: " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p) for name, p in series.items()}
    body = [f'<polyline class="series" data-series="{html.escape(name)}" fill="none" stroke-width="1.5" '
            f'stroke="{SVG_COLOURS[i % len(SVG_COLOURS)]}" points="{pixels[name]}"/>' for i, name in enumerate(series)]
    return _svg(title, x_label, y_label, y_ticks, [(sx(t), f"{t:.6g}") for t in x_ticks], list(series), body)


def svg_bars(groups: dict[str, dict[str, float]], title: str, y_label: str,
             errors: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    """A grouped bar chart as standalone SVG, a whisker from low to high where errors[group][series] = (low, high)."""
    names, errors = list(dict.fromkeys(s for bars in groups.values() for s in bars)), errors or {}
    if not names:
        raise ValueError(f"svg_bars({title!r}) got no bars: give each group a dict of series -> value")
    values = [v for bars in groups.values() for v in bars.values()]
    values += [e for whiskers in errors.values() for pair in whiskers.values() for e in pair]
    y_ticks = nice_ticks(min(0.0, *values), max(0.0, *values))
    sy, slot = _axis(y_ticks, SVG_BOTTOM, SVG_TOP), (SVG_RIGHT - SVG_LEFT) / len(groups)
    width, body = 0.8 * slot / len(names), []
    for g, (group, bars) in enumerate(groups.items()):
        for i, name in ((i, name) for i, name in enumerate(names) if name in bars):
            x, v, c = SVG_LEFT + (g + 0.1 + 0.8 * i / len(names)) * slot, bars[name], SVG_COLOURS[i % len(SVG_COLOURS)]
            body.append(f'<rect class="bar" data-series="{html.escape(name)}" x="{x:.1f}" y="{sy(max(v, 0)):.1f}" '
                        f'width="{width:.1f}" height="{abs(sy(v) - sy(0)):.1f}" fill="{c}">'
                        f'<title>{html.escape(f"{group}, {name}: {v:.6g}")}</title></rect>')
            if name in errors.get(group, {}):
                (low, high), mid, tick = errors[group][name], x + width / 2, f"h{width / 2:.1f}"
                body.append(f'<path class="error" d="M{mid:.1f},{sy(low):.1f}V{sy(high):.1f}M{mid - width / 4:.1f},'
                            f'{sy(low):.1f}{tick}M{mid - width / 4:.1f},{sy(high):.1f}{tick}" stroke="black"/>')
    x_ticks = [(SVG_LEFT + (g + 0.5) * slot, group) for g, group in enumerate(groups)]
    return _svg(title, "", y_label, y_ticks, x_ticks, names, body)

