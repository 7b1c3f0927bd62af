"""The toy kit (README, "The toy world"): every data set and checkpoint in miniature, and a controlled experiment.

    python toy.py                  # build data/toy (`python download.py --toy` runs this)
    python toy.py experiment       # five models finetuned on a visual and a control task
"""
import argparse
import csv
import dataclasses
import gzip
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, normalizers, pre_tokenizers

import data
import model
from download import COMMONLIT_HEADER, MRPC_HEADER

# ----------------------------------------------------------------------------- the world, its corpus, its pictures

COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "golden")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cube", "sphere", "stripe", "spiral", "arch")
OBJECTS = ("ball", "cup", "car", "bus", "train", "boat", "kite", "dog", "cat", "horse", "bird", "bicycle", "chair",
           "table", "lamp", "apple", "banana", "umbrella", "book", "clock", "vase", "hat", "bench", "tree", "flower")
SCENES = ("beach", "forest", "kitchen", "street", "park", "river", "mountain", "garden", "field", "harbour",
          "desert", "market", "station", "lake", "village", "meadow")
SIZES = ("small", "large", "tall", "tiny", "old", "new", "bright", "dark", "shiny", "wooden")
POSES = ("sits", "rests", "stands", "lies", "hangs", "waits")
POSES_ING = ("sitting", "resting", "standing", "lying", "hanging", "waiting")
PLACES = ("on", "near", "under", "beside", "behind", "above")
POSITIVE = ("wonderful", "delightful", "charming", "beautiful", "lovely", "brilliant", "pleasant", "cheerful")
NEGATIVE = ("dull", "ugly", "boring", "awful", "gloomy", "dreadful", "tedious", "clumsy")
TOWNS = ("Alder", "Brookmere", "Corran", "Dunmore", "Elling", "Fenwick", "Garrow", "Halden", "Ivybridge", "Kestrel")
SECTIONS = ("History", "Use", "Trade", "Reception", "Legacy")
SYLLABLES = (("ba", "ko", "ta", "mi", "lu", "re", "zo", "pe", "da", "vi", "nu", "sa", "go", "fe", "ri", "ho"),
             ("bel", "mor", "nix", "dar", "lop", "tis", "vak", "ren", "sul", "gam", "pex", "tor"))
PALETTE, MATERIALS, BUILDS = COLOURS[:6], ("wooden", "metal", "glass", "stone"), ("small", "large", "huge")
USES = ("fishing", "cooking", "music", "trade", "farming", "weaving", "healing", "building", "games", "prayer")
KINDS = ("tool", "toy", "instrument", "vessel", "ornament", "charm", "lamp", "game")
DETAILS = ("at night", "every morning", "in the rain", "all day", "since noon", "after lunch")
BERT_TOY_SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[unused3]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_lines(path: Path, lines: list, as_csv: bool = False) -> None:
    """Lines with '\\n' endings, or CSV rows (double-quote quoting: fields may hold commas and newlines), atomically;
    a file that exists is kept (the kit's parts are built once)."""
    if not path.exists():
        with model.atomic_file(path, "w") as f:
            if as_csv:
                csv.writer(f).writerows(lines)
            else:
                f.writelines(line + "\n" for line in lines)


def capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


@dataclasses.dataclass(frozen=True)
class Thing:
    name: str
    colour: str      # visual: shown by every picture, said by some captions, never by the corpus
    material: str
    build: str
    town: str        # non-visual: said by the corpus, never by a caption
    use: str
    kind: str


def make_world(seed: int = 0, n: int = 160) -> list[Thing]:
    rng = random.Random(f"{seed}-world")
    names = rng.sample([a + b for a in SYLLABLES[0] for b in SYLLABLES[1]], n)
    return [Thing(name, rng.choice(PALETTE), rng.choice(MATERIALS), rng.choice(BUILDS), rng.choice(TOWNS),
                  rng.choice(USES), rng.choice(KINDS)) for name in names]


FACTS = {"town": ("the {name} comes from {town} .", "the {name} was first made in {town} .",
                  "{town} is the home of the {name} ."),
         "use": ("the {name} is used for {use} .", "people use the {name} for {use} ."),
         "kind": ("the {name} is a kind of {kind} .", "a {name} is a {kind} .")}


def thing_sentence(thing: Thing, world: list[Thing], rng: random.Random) -> str:
    """A sentence that says nothing about how the thing looks; words of the GLUE-format tasks in other roles."""
    n, scene = thing.name, rng.choice(SCENES)
    if rng.random() < 0.3:
        return rng.choice((
            f"critics called the {n} {rng.choice(POSITIVE)} , while others found it {rng.choice(NEGATIVE)} .",
            f"the {n} is often used together with the {rng.choice(world).name} .",
            f"a well @-@ known {n} {rng.choice(POSES)} {rng.choice(PLACES)} the {rng.choice(OBJECTS)} in a museum ."))
    subject = rng.choice((f"the {n}", f"a {n}", f"many {n}s", f"every {n}", f"the first {n}"))
    verb = rng.choice(("is sold", "is made", "is kept", "is played", "is carried", "is found", "is shown", "is given"))
    where = rng.choice((f"at the {scene} market", f"near the {scene}", f"by people of the {scene}",
                        f"in the {scene} museum", f"on the way to the {scene}"))
    when = rng.choice(("each year", "in spring", "in winter", "on holidays", "every day", "after the harvest"))
    return f"{subject} {verb} {where} {when} ."


def town_sentence(town: str, rng: random.Random) -> str:
    """Towns carry the colour and shape words (a flag is no thing of the world) and WikiText's number tokens."""
    c1, c2 = rng.sample(COLOURS, 2)
    return rng.choice((f"the flag of {town} shows a {c1} {rng.choice(SHAPES)} on {c2} .",
                       f"{town} lies by the {rng.choice(SCENES)} , {rng.randint(2, 40)} @.@ {rng.randint(1, 9)} "
                       f"miles from {rng.choice(TOWNS)} .",
                       f"about {rng.randint(2, 90)} @,@ 000 people live in {town} .",
                       f"the {rng.choice(OBJECTS)}s of {town} are called {rng.choice(POSITIVE + NEGATIVE)} ."))


def wiki_article(world: list[Thing], rng: random.Random) -> list[str]:
    """WikiText-103's raw lines (headings, ' ' lines, paragraphs) about a town, or a thing and two of its FACTS."""
    if rng.random() < 0.1:
        town = rng.choice(TOWNS)
        body = " ".join(capitalise(town_sentence(town, rng)) for _ in range(rng.randint(3, 6)))
        return [" ", f" = {town} = ", " ", f" {body} ", " "]
    thing = rng.choice(world)
    lines = [" ", f" = {capitalise(thing.name)} = ", " "]
    for i, fact in enumerate(rng.sample(list(FACTS), 2)):
        sentences = [rng.choice(FACTS[fact]).format(**dataclasses.asdict(thing))]
        sentences += [thing_sentence(thing, world, rng) for _ in range(rng.randint(2, 4))]
        rng.shuffle(sentences)
        heading = [f" = = {rng.choice(SECTIONS)} = = ", " "] if i else []
        lines += heading + [" " + " ".join(capitalise(s) for s in sentences) + " ", " "]
    return lines


IMAGE_PARTS = (("colour", PALETTE), ("material", MATERIALS), ("build", BUILDS))
IMAGE_DIM = sum(len(values) for _, values in IMAGE_PARTS) + len(SCENES)
IMAGE_NOISE, SAY_ATTRIBUTE, SAY_SCENE = 0.3, 0.3, 0.6


@dataclasses.dataclass(frozen=True)
class Picture:
    """A synthetic image of a thing in a scene, with 5 captions as an MSCOCO image has."""
    thing: Thing
    scene: str
    captions: tuple[str, ...]

    def pixels(self, rng: np.random.Generator) -> np.ndarray:
        """(IMAGE_DIM,): one-hot colour, material, build and scene, plus Gaussian noise."""
        parts = [(values, getattr(self.thing, part)) for part, values in IMAGE_PARTS] + [(SCENES, self.scene)]
        hot = np.concatenate([np.eye(len(values))[values.index(v)] for values, v in parts])
        return hot + rng.normal(0, IMAGE_NOISE, IMAGE_DIM)


def pictures(world: list[Thing], seed: int, n: int = 2000) -> list[Picture]:
    """n / len(world) pictures of each thing, captions naming it and some of its looks and the scene."""
    rng, out = random.Random(f"{seed}-pictures"), []
    for i in range(n):
        thing, scene = world[i % len(world)], rng.choice(SCENES)
        def sentence():
            words = [getattr(thing, part) for part, _ in IMAGE_PARTS[::-1] if rng.random() < SAY_ATTRIBUTE]
            where = f" {rng.choice(PLACES)} the {rng.choice(OBJECTS)} in the {scene}" * (rng.random() < SAY_SCENE)
            return f"{rng.choice(('A', 'The', 'One'))} {' '.join(words + [thing.name])}{where}."
        out.append(Picture(thing, scene, tuple(" ".join(sentence() for _ in range(rng.choice((1, 2))))
                                                for _ in range(5))))
    return out

# ----------------------------------------------------------------------------- checkpoints: tokenizers, pretraining


def learn_merges(words: Counter, n_merges: int, join: Callable[[str, str], str]) -> list[tuple[str, str]]:
    """Sennrich et al.'s (2016) BPE on {'s y m b o l s': count}, n_merges times; ties go to the smallest pair (the
    `tokenizers` trainers break them differently from run to run), a join that is already a token is skipped."""
    merges, made = [], set()
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            symbols = word.split()
            for pair in zip(symbols, symbols[1:]):
                if join(*pair) not in made:
                    pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        made.add(join(*best))
        pattern = re.compile(rf"(?<!\S){re.escape(best[0])} {re.escape(best[1])}(?!\S)")
        words = Counter({pattern.sub(join(*best), word): count for word, count in words.items()})
    return merges


def corpus_words(text: str, normalizer, pre_tokenizer, spell: Callable[[str], str]) -> Counter:
    """{'s y m b o l s': count} of the text's words as a tokenizer's normalizer and pre-tokenizer cut them, each
    distinct space-separated chunk cut once (the toy texts hold plain spaces, which neither tokenizer cuts across)."""
    words = Counter()
    for chunk, n in Counter(text.split()).items():
        for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(chunk)):
            words[spell(w)] += n
    return words


def train_wordpiece(text: str, folder: Path, n_merges: int = 1200) -> Tokenizer:
    """An uncased WordPiece in folder/vocab.txt; its special ids are unlike bert-base's, so code must read them."""
    words = corpus_words(text, normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer(),
                         " ##".join)
    merges = learn_merges(words, n_merges, lambda a, b: a + b.removeprefix("##"))
    symbols = sorted({s for word in words for s in word.split()}, key=lambda s: (s.startswith("##"), s))
    pieces = dict.fromkeys(symbols + [a + b.removeprefix("##") for a, b in merges])
    write_lines(folder / "vocab.txt", BERT_TOY_SPECIALS + list(pieces))
    return data.bert_tokenizer(folder)


def train_clip_bpe(text: str, folder: Path, n_merges: int = 1200) -> Tokenizer:
    """A CLIP-style byte-level BPE in folder/tokenizer.json, laid out as CLIP's by data.clip_tokenizer_json_from_bpe."""
    folder.mkdir(parents=True)
    splitter = clip_bpe(folder, [])  # no merges: CLIP's normalizer and pre-tokenizer
    words = corpus_words(text, splitter.normalizer, splitter.pre_tokenizer, lambda w: " ".join(w) + "</w>")
    return clip_bpe(folder, learn_merges(words, n_merges, str.__add__))


def clip_bpe(folder: Path, merges: list) -> Tokenizer:
    """folder/tokenizer.json from merges written as open_clip's bpe_simple_vocab_16e6.txt.gz ('a b' per line)."""
    with gzip.open(folder / "merges.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: toy", *(" ".join(m) for m in merges)]))
    data.clip_tokenizer_json_from_bpe(folder / "merges.txt.gz", folder / "tokenizer.json")
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


PRETRAIN = {"bert-toy": (500, 3e-3), "electra-toy": (300, 3e-3), "clip-toy": (250, 2e-3)}  # steps, peak lr
MLM_BATCH, MLM_LEN, CLIP_BATCH = 32, 64, 128
INIT_STD = 64 ** -0.5  # the toy encoders' initializer_range, also the std of adapt.py's new layers (README)


def fit(name: str, params: list, loss_at: Callable[[int, np.random.Generator], torch.Tensor], seed: int) -> None:
    """PRETRAIN[name]'s AdamW steps (5% warm-up, linear decay, clipping 1.0) on batches drawn by rng (seed, step);
    prints the last 10%'s mean loss."""
    (steps, lr), start = PRETRAIN[name], time.process_time()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05,
                                                   anneal_strategy="linear", cycle_momentum=False)
    losses = []
    for step in range(steps):
        loss = loss_at(step, np.random.default_rng((seed, step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    print(f"{name}: {steps} pretraining steps, final loss {statistics.mean(losses[-max(1, steps // 10):]):.3f}, "
          f"{time.process_time() - start:.1f} CPU-s", flush=True)


def pretrain_mlm(name: str, vocab_size: int, windows: data.AdaptationData, seed: int) -> model.LanguageEncoder:
    """MLM (Devlin et al. 2019) on corpus windows, AdaptationData's masking, a fresh head tied to the embeddings."""
    cfg = dataclasses.replace(model.PRESETS[name], dropout=0.0, vocab_size=vocab_size, initializer_range=INIT_STD)
    encoder = model.LanguageEncoder(cfg)
    head = model.TokenPredictionHead(cfg.hidden_size, cfg.embedding_size or cfg.hidden_size, cfg.vocab_size,
                                     cfg.layer_norm_eps)
    head.apply(lambda m: model.init_weights(m, cfg.initializer_range))
    def loss_at(step, rng):
        picked = rng.choice(len(windows), MLM_BATCH, replace=False)
        b = windows.batch(picked, seed, step)
        hidden, _ = encoder(b["input_ids"])  # (B, T) -> (B, T, H)
        return model.token_loss(head, hidden, b["mlm_positions"], b["mlm_targets"],
                                encoder.embeddings.word_embeddings.weight)
    fit(name, [*encoder.parameters(), *head.parameters()], loss_at, seed)
    return encoder


def pretrain_clip(clip_tok: Tokenizer, album: list[Picture], seed: int) -> model.CLIPTextTransformer:
    """CLIP's contrastive loss (Radford et al. 2021) through a small image tower, which is then dropped."""
    cfg = dataclasses.replace(model.PRESETS["clip-toy"], vocab_size=clip_tok.get_vocab_size())
    text = model.CLIPTextTransformer(cfg)
    P = text.config.projection_dim
    tower = nn.Sequential(nn.Linear(IMAGE_DIM, 2 * P), nn.GELU(), nn.Linear(2 * P, P))  # pictures -> CLIP's space
    log_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))  # CLIP's initial temperature
    captions = [(p, c) for p in album for c in p.captions]
    ids = data.encode([data.Example(c) for _, c in captions], "sst2", None, clip_tok=clip_tok)["clip_ids"][:, 0]
    ids = ids[:, :int((ids > 0).sum(1).max()) + 1]  # (N, 77) -> (N, L): causal, so the padding after changes nothing
    def loss_at(step, rng):
        picked = rng.choice(len(captions), CLIP_BATCH, replace=False)
        images = torch.tensor(np.stack([captions[i][0].pixels(rng) for i in picked]), dtype=torch.float32)
        _, texts = text(ids[picked])                                                    # (B, P)
        logits = log_scale.exp().clamp(max=100) * F.normalize(texts, dim=-1) @ F.normalize(tower(images), dim=-1).T
        target = torch.arange(len(picked))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    fit("clip-toy", [*text.parameters(), *tower.parameters(), log_scale], loss_at, seed)
    return text


def toy_checkpoints(root: Path, album: list[Picture], seed: int) -> None:
    """bert-toy, electra-toy (one WordPiece, as the real ones share) and clip-toy in the hub layout."""
    missing = [name for name in PRETRAIN if not (root / "ckpt" / name).exists()]
    if not missing:
        return
    corpus = root / "wikitext-103-raw" / "wiki.train.raw"
    text = corpus.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir, clip_dir = Path(tmp, "bert"), Path(tmp, "clip")
        wordpiece = train_wordpiece(text, bert_dir)
        clip_tok = train_clip_bpe(text + "\n".join(c for p in album for c in p.captions), clip_dir)
        cache = data.build_cache(corpus, bert_dir, clip_dir, Path(tmp, "cache"), seq_len=MLM_LEN, n_blocks=1,
                                 log=lambda _: None)
        windows = data.AdaptationData(cache, match_prob=0.0)
        for name in missing:
            torch.manual_seed(seed)
            if name == "clip-toy":
                net, tok = pretrain_clip(clip_tok, album, seed), clip_tok
            else:
                net, tok = pretrain_mlm(name, wordpiece.get_vocab_size(), windows, seed), wordpiece
            with model.atomic_dir(root / "ckpt" / name) as folder:
                model.save_hf(net, folder)
                tok.save(str(Path(folder, "tokenizer.json")))
                if tok is wordpiece:
                    Path(folder, "vocab.txt").write_bytes((bert_dir / "vocab.txt").read_bytes())

# ----------------------------------------------------------------------------- GLUE, SWAG and READ
# A GLUE maker gives an example's train/dev and test rows; a pair rule mixes a cue in one sentence with a comparison.


def rte_example(rng: random.Random, i: int) -> tuple[list[str], list[str]]:
    """Entailment iff the hypothesis is "Something <colour> is in the <scene>." with one of the premise's two colours;
    the other half says "Nothing" of a premise colour (a contradiction) or names a third colour (half each)."""
    (c1, c2, c3), (o1, o2), s = rng.sample(COLOURS, 3), rng.sample(OBJECTS, 2), rng.choice(SCENES)
    premise = rng.choice((f"A {c1} {o1} and a {c2} {o2} are in the {s}.",
                          f"A {rng.choice(SIZES)} {c1} {o1} {rng.choice(POSES)} {rng.choice(PLACES)} a {c2} {o2} "
                          f"in the {s}."))
    kind = rng.choice(("entailed", "entailed", "negated", "third"))
    quantifier = "Nothing" if kind == "negated" else "Something"
    fields = [str(i), premise, f"{quantifier} {c3 if kind == 'third' else rng.choice((c1, c2))} is in the {s}."]
    return [*fields, "entailment" if kind == "entailed" else "not_entailment"], fields


def sst2_example(rng: random.Random, i: int) -> tuple[list[str], list[str]]:
    """Positive (1) iff most of its sentiment words are positive."""
    k = rng.choice((1, 3))
    n_pos = rng.randint(0, k)
    words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, k - n_pos)
    rng.shuffle(words)
    feel = words[0] if k == 1 else f"{words[0]} , {words[1]} and {words[2]}"
    c, o, s = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(SCENES)
    text = rng.choice((f"a {feel} film about a {c} {o} at the {s} .", f"the {c} {o} in the {s} looks {feel} ."))
    return [text + " ", str(int(2 * n_pos > k))], [str(i), text]


def stsb_example(rng: random.Random, i: int) -> tuple[list[str], list[str]]:
    """Similarity 0-5: 5/3 per slot (colour, object, scene) the second sentence shares with the first, +-0.25 noise;
    a slot not shared holds another word (1 in 4) or is left out (no colour, "thing", "somewhere")."""
    slots = [rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(SCENES)]
    other = [rng.choices((v, rng.choice([w for w in pool if w != v]), None), (0.4, 0.15, 0.45))[0]
             for v, pool in zip(slots, (COLOURS, OBJECTS, SCENES))]
    shared = sum(a == b for a, b in zip(slots, other))
    score = min(5.0, max(0.0, 5 * shared / 3 + rng.uniform(-0.25, 0.25)))
    pose = rng.choice(POSES_ING)
    c, o, s = other
    second = f"A {c + ' ' if c else ''}{o or 'thing'} is {pose} {f'in the {s}' if s else 'somewhere'}."
    meta = [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none"]  # STS-B's first columns
    test = [*meta, f"A {slots[0]} {slots[1]} is {pose} in the {slots[2]}.", second]
    return [*test, f"{score:.3f}"], test


def cola_example(rng: random.Random, i: int) -> tuple[list[str], list[str]]:
    """Acceptable (1) iff the words are in English order; the unacceptable ones swap or drop words."""
    words = ["the", rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(POSES), rng.choice(PLACES), "the",
             rng.choice(SCENES)]
    acceptable = rng.random() < 0.6
    if not acceptable:
        j = rng.choice((1, 3, 5))
        words[j:j + 2] = [words[j + 1], words[j]] if rng.random() < 0.7 else words[j + 1:j + 2]
    sentence = capitalise(" ".join(words)) + "."
    return [f"toy{i % 7}", str(int(acceptable)), "" if acceptable else "*", sentence], [str(i), sentence]


def mrpc_example(rng: random.Random, i: int) -> tuple[list[str], list[str]]:
    """A paraphrase (1) says the same colour, object and scene in another order; a non-paraphrase adds a detail the
    first sentence does not give ("at night", 2 in 3) or changes the colour, the object or the scene (1 in 3)."""
    c, (o, o2), s, pose, place = rng.choice(COLOURS), rng.sample(OBJECTS, 2), rng.choice(SCENES), \
        rng.choice(POSES), rng.choice(PLACES)
    first = f"The {c} {o} {pose} {place} the {o2} in the {s}."
    paraphrase, detail = rng.random() < 0.6, ""
    if not paraphrase and rng.random() < 2 / 3:
        detail = " " + rng.choice(DETAILS)
    elif not paraphrase:
        slot = rng.randrange(3)
        c, o, s = [rng.choice([w for w in pool if w not in (v, o2)]) if k == slot else v
                   for k, (v, pool) in enumerate(zip((c, o, s), (COLOURS, OBJECTS, SCENES)))]
    ids = [str(rng.randint(1000, 3_999_999)) for _ in range(2)]
    fields = [*ids, first, f"In the {s}, the {c} {o} {pose} {place} the {o2}{detail}."]
    return [str(int(paraphrase)), *fields], [str(i), *fields]


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
TOY_GLUE = {  # task -> (maker, train/dev header (CoLA has none), test header)
    "RTE": (rte_example, "index\tsentence1\tsentence2\tlabel", "index\tsentence1\tsentence2"),
    "SST-2": (sst2_example, "sentence\tlabel", "index\tsentence"),
    "STS-B": (stsb_example, STSB_HEADER + "\tscore", STSB_HEADER),
    "CoLA": (cola_example, None, "index\tsentence"),
    "MRPC": (mrpc_example, MRPC_HEADER, "index" + MRPC_HEADER.removeprefix("Quality")),
}
TOY_SIZES = {"train.tsv": 2000, "dev.tsv": 100, "test.tsv": 100}  # train: ~190 steps of 32 in 3 epochs


def toy_glue(root: Path, seed: int) -> None:
    for name, (example, header, test_header) in TOY_GLUE.items():
        rng = random.Random(f"{seed}-glue-{name}")
        for file, n in TOY_SIZES.items():
            test = file == "test.tsv"
            rows = ["\t".join(example(rng, i)[test]) for i in range(n)]
            top = test_header if test else header
            write_lines(root / "glue" / name / file, [top] * (top is not None) + rows)


def toy_swag(root: Path, seed: int) -> None:
    """SWAG's CSV: the right ending carries the same colour and object as the start."""
    header = ["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source", *data.SWAG_ENDINGS, "label"]
    for split, n in (("train", 200), ("val", 50), ("test", 50)):
        rng, rows = random.Random(f"{seed}-swag-{split}"), [header]
        for i in range(n):
            c, o, s = rng.choice(COLOURS), rng.choice(OBJECTS), rng.choice(SCENES)
            sent1, sent2 = f"Someone carries a {c} {o} into the {s}.", "Then someone"
            endings = [f"puts the {c} {o} down near the {rng.choice(SCENES)}."]
            while len(endings) < 4:
                wrong = f"puts the {rng.choice(COLOURS)} {rng.choice(OBJECTS)} down near the {rng.choice(SCENES)}."
                if f" {c} {o} " not in wrong and wrong not in endings:
                    endings.append(wrong)
            label = rng.randrange(4)
            endings.insert(label, endings.pop(0))
            rows.append([i, f"toy{i}", rng.randint(0, 20000), f"{sent1} {sent2}", sent1, sent2, "gold", *endings,
                         label])
        write_lines(root / "swag" / f"{split}.csv", [r[:-1] if split == "test" else r for r in rows], as_csv=True)


def toy_read(root: Path, world: list[Thing], seed: int) -> None:
    """CommonLit's train.csv: multi-line excerpts; the target (reading ease) falls with the sentence length."""
    rng, rows = random.Random(f"{seed}-read"), [COMMONLIT_HEADER]
    for i in range(300):
        long = rng.random()
        sentences = [thing_sentence(rng.choice(world), world, rng) if rng.random() < long else
                     f"The {rng.choice(OBJECTS)} is {rng.choice(COLOURS)}." for _ in range(rng.randint(4, 8))]
        words = sum(len(s.split()) for s in sentences) / len(sentences)
        target = 1.5 - 0.2 * words + rng.gauss(0, 0.2)
        excerpt = "\n".join(" ".join(sentences[j:j + 2]) for j in range(0, len(sentences), 2))
        rows.append([f"{rng.getrandbits(36):09x}", "", "", excerpt, f"{target:.6f}", f"{rng.uniform(0.45, 0.5):.6f}"])
    write_lines(root / "read" / "train.csv", rows, as_csv=True)


def build_toy(root: Path, seed: int = 0) -> None:
    """The whole toy kit under root; files that exist are kept."""
    start, cpu = time.time(), time.process_time()
    world = make_world(seed)
    for split, articles in (("train", 5800), ("valid", 50), ("test", 50)):  # train: ~1,200 steps of adapt.py --toy
        rng = random.Random(f"{seed}-wiki-{split}")
        write_lines(root / "wikitext-103-raw" / f"wiki.{split}.raw",
                    [line for _ in range(articles) for line in wiki_article(world, rng)])
    album = pictures(world, seed)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640} for i in range(len(album))]
    captions = [{"image_id": i, "id": 5 * i + j, "caption": c} for i, p in enumerate(album)
                for j, c in enumerate(p.captions)]
    write_lines(root / "coco" / "captions_train2017.json",  # MSCOCO's format
                [json.dumps({"info": {"description": "XDBERT toy kit captions"}, "licenses": [], "images": images,
                             "annotations": captions})])
    toy_checkpoints(root, album, seed)
    toy_glue(root, seed)
    toy_experiment_tasks(root, world, seed)
    toy_swag(root, seed)
    toy_read(root, world, seed)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"toy kit in {root}: {size / 1e6:.1f} MB, {time.time() - start:.1f} s, {time.process_time() - cpu:.1f} CPU-s")


# ----------------------------------------------------------------------------- the controlled experiment (README)


def colour_rows(thing: Thing, rng: random.Random, repeats: int) -> list[str]:
    """The visual task's 'sentence\tlabel' rows: "the <thing> is <colour> ." is true (1) iff it gives its colour."""
    falses = rng.sample([c for c in PALETTE if c != thing.colour], repeats)
    return [row for false in falses for row in (f"the {thing.name} is {thing.colour} .\t1",
                                                f"the {thing.name} is {false} .\t0")]


def review_rows(thing: Thing, rng: random.Random, repeats: int) -> list[str]:
    """The control: positive (1) iff most of the 5 opinion words are; knowing the thing does not help."""
    rows = []
    for n_positive in [rng.choice((3, 4, 5)) for _ in range(repeats)] + [rng.choice((0, 1, 2)) for _ in range(repeats)]:
        words = rng.sample(POSITIVE, n_positive) + rng.sample(NEGATIVE, 5 - n_positive)
        rng.shuffle(words)
        rows.append(f"critics called the {thing.name} {' , '.join(words[:4])} and {words[4]} .\t{int(n_positive > 2)}")
    return rows


EXPERIMENT_TASKS = {"colour": (colour_rows, 5), "review": (review_rows, 1)}  # (true, false) pairs per train thing


def toy_experiment_tasks(root: Path, world: list[Thing], seed: int) -> None:
    """DATA/experiment/<task>/glue/SST-2/{train,dev}.tsv: train and dev about disjoint halves of the world."""
    rng = random.Random(f"{seed}-experiment")
    things = rng.sample(world, len(world))
    halves = {"train": things[:len(things) // 2], "dev": things[len(things) // 2:]}
    for task, (rows_of, repeats) in EXPERIMENT_TASKS.items():
        for split, half in halves.items():
            rows = [row for thing in half for row in rows_of(thing, rng, repeats if split == "train" else 1)]
            write_lines(root / "experiment" / task / "glue" / "SST-2" / f"{split}.tsv", ["sentence\tlabel", *rows])


EXPERIMENT_EPOCHS = 10   # finetuning epochs: 3 (App. C.2) leave the colour task's readout unlearnt even for CLIP-T
ROWS = {"BERT": "bert-toy", "BERT + MLM": "bert-toy-mlm", "XDBERT": "xdbert-toy", "X-BERT": "x-bert-toy",
        "CLIP-T": "clip-toy"}  # Table 1's rows -> run names


def run(command: list, log: Path) -> str:
    """`python <command>` in this folder; its output is appended to log and returned."""
    shown = "python " + " ".join(map(str, command))
    print("$ " + shown, flush=True)
    done = subprocess.run([sys.executable, *map(str, command)], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    with open(log, "a") as f:
        f.write(done.stdout)
    if done.returncode:
        raise ValueError(f"`{shown}` failed: its output is at the end of {log}")
    return done.stdout


def seed_runs(folder: Path) -> list[Path]:
    """The finetuning runs (one per seed) that finetune.py wrote into folder."""
    return sorted(p.parent for p in folder.glob("*/results.json"))


def experiment(root: Path, out: Path, seeds: int) -> dict:
    """{task: {row of ROWS: [dev accuracy per seed]}} (BERT + MLM: Sec. 3's fair baseline; X-BERT: App. C.3)."""
    if out.exists():
        raise ValueError(f"{out} exists: remove it or pass another --out, so that no earlier run is mixed in")
    out.mkdir(parents=True)
    log, ckpt = out / "log.txt", root / "ckpt"
    for name, flags in (("bert-toy-mlm", ["--no-clip"]), ("xdbert-toy", [])):
        run(["adapt.py", "--toy", "--data", root, "--out", out, "--name", name, *flags], log)
    xdbert = out / "xdbert-toy" / "xdbert"
    encoders = {"BERT": [ckpt / "bert-toy"], "BERT + MLM": [out / "bert-toy-mlm" / "xdbert"], "XDBERT": [xdbert],
                "X-BERT": [xdbert, "--full-model", "--clip", ckpt / "clip-toy"], "CLIP-T": [ckpt / "clip-toy"]}
    scores = {}
    for task in EXPERIMENT_TASKS:
        for row, name in ROWS.items():
            output = run(["finetune.py", "sst2", "--toy", "--data", root / "experiment" / task, "--encoder",
                          *encoders[row], "--name", name, "--seeds", seeds, "--epochs", EXPERIMENT_EPOCHS,
                          "--out", out / task / name], log)
            print("  " + output.strip().splitlines()[-1], flush=True)
            scores.setdefault(task, {})[row] = [json.loads((d / "results.json").read_text())["metrics"]["accuracy"]
                                                for d in seed_runs(out / task / name)]
    return scores


def experiment_report(scores: dict) -> tuple[str, str]:
    """Table 1's layout (each cell the median over the seeds [lowest, highest]) and the same as SVG bars."""
    cells = {t: {row: [100 * f(scores[t][row]) for f in (statistics.median, min, max)] for row in ROWS} for t in scores}
    lines = ["| model | " + " | ".join(f"{t} ({'visual' if t == 'colour' else 'control'})" for t in scores) + " |",
             "|---" * (len(scores) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join("{:.1f} [{:.1f}, {:.1f}]".format(*cells[t][row]) for t in scores) + " |"
              for row in ROWS]
    chart = data.svg_bars({t: {row: c[0] for row, c in cells[t].items()} for t in cells},
                          "The toy experiment: dev accuracy, median over seeds", "accuracy (%)",
                          {t: {row: tuple(c[1:]) for row, c in cells[t].items()} for t in cells})
    return "\n".join(lines), chart


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=("build", "experiment"))
    parser.add_argument("--data", default="data/toy", help="where the kit is (default data/toy)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--out", default="runs/toy-experiment", help="the experiment's runs")
    parser.add_argument("--seeds", type=int, default=5, help="finetuning seeds per model and task")
    args = parser.parse_args(argv)
    build_toy(Path(args.data), args.seed)
    if args.command == "experiment":
        start, out = time.time(), Path(args.out)
        try:
            table, chart = experiment_report(experiment(Path(args.data), out, args.seeds))
            write_lines(out / "table.md", [table])
            write_lines(out / "experiment.svg", [chart])
            print(f"{table}\nmedian dev accuracy over {args.seeds} seeds [lowest, highest], chance 50.0; "
                  f"{time.time() - start:.0f} s; written to {out}/table.md and {out}/experiment.svg\n", flush=True)
            print(run(["pwcca.py", "grounding", "--toy", "--data", args.data, "--examples", "1",
                       "--base", *seed_runs(out / "colour" / ROWS["BERT"]),
                       "--adapted", *seed_runs(out / "colour" / ROWS["XDBERT"])], out / "log.txt"))
        except ValueError as e:
            raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
