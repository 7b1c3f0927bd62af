"""Sec. 4's analyses: PWCCA between input word-embedding spaces (Table 2) and the visually grounded ratio of the dev
examples that adaptation improved or worsened (Fig. 4, App. D). Commands and PWCCA's two readings: see the README."""
import argparse
import itertools
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

import data
import model


@dataclass
class PWCCAConfig:
    """The settings of both analyses; PRESETS["paper"] is Table 2's and App. D's, PRESETS["toy"] the toy kit's."""
    data: str = "data"
    names: tuple[str, ...] = ("bert-base", "electra-base", "clip")   # Table 2: each pair, then the first vs RANDOM
    words: int = 4500                  # the most frequent shared words (0: all); why 4,500: the README's word list
    reading: str = "svcca"             # or "textbook" (Morcos et al.'s definition)
    epsilon: float = 1e-8              # relative singular-value cut-off for rank
    base: tuple[str, ...] = ()         # grounding: run dirs (or dev_predictions.jsonl files) of the base model
    adapted: tuple[str, ...] = ()      # grounding: the same for the adapted (XDBERT) model
    encoder: str = "bert-base"         # whose WordPieces are counted (App. D)
    captions: str | None = None        # default DATA/coco/captions_train2017.json
    threshold: int = 100               # App. D, after Tan and Bansal 2020: grounded = over 100 caption occurrences
    examples: int = 3                  # App. D-style examples printed per group
    svg: str | None = None             # Fig. 4's chart; default grounding.svg in the folder of the adapted runs


PRESETS = {"paper": PWCCAConfig(),
           "toy": PWCCAConfig(data="data/toy", names=("bert-toy", "electra-toy", "clip-toy"), encoder="bert-toy")}


# ----------------------------------------------------------------------------- PWCCA (Morcos et al. 2018)

def centre(x):
    """Subtract each neuron's (column's) mean over the data points: (n, p) -> (n, p)."""
    return x - x.mean(axis=0, keepdims=True)


def orthonormal_basis(x, epsilon):
    """Thin SVD x = Q diag(s) V^T without the singular values below epsilon times the largest: Q (n, r), V (p, r)."""
    q, s, vt = np.linalg.svd(x, full_matrices=False)          # (n, m), (m,), (m, p) with m = min(n, p)
    keep = s > epsilon * s[0]
    if not keep.any():
        raise ValueError("a data set is constant over its data points, so it has no canonical directions")
    return q[:, keep], vt[keep].T


def canonical_correlations(x, y, epsilon=1e-8):
    """CCA of x (n, p) and y (n, q) over the same n rows. With centred x = Qx diag(s) V^T and Qy likewise, the singular
    values of Qx^T Qy = A diag(rho) B^T are the k = min(rank x, rank y) canonical correlations, h = Qx A are x's
    canonical variates (unit norm), u = V A the left singular vectors of Cxx^-1/2 Cxy Cyy^-1/2: rho, h (n,k), u (p,k)"""
    qx, vx = orthonormal_basis(centre(x), epsilon)
    qy, _ = orthonormal_basis(centre(y), epsilon)
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)      # (rx, k), (k,)
    return np.clip(rho, 0.0, 1.0), qx @ a, vx @ a


def pwcca(x, y, reading="svcca", epsilon=1e-8):
    """Projection-weighted CCA (Morcos et al. 2018; Table 2): sum_i alpha_i rho_i of x (n, p) and y (n, q), alpha
    from x; "textbook" is Morcos et al.'s definition, "svcca" their code's (compute_pwcca)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need two matrices over the same data points (rows), got {x.shape} and {y.shape}")
    if reading == "svcca" and y.shape[1] < x.shape[1]:
        x, y = y, x          # svcca weighs by the set with fewer neurons (x on a tie), as its code means to
    rho, h, u = canonical_correlations(x, y, epsilon)
    if reading == "textbook":                          # alpha_i = sum_j |<h_i, x_j>| over x's centred neurons x_j
        alpha = np.abs(h.T @ centre(x)).sum(axis=1)
    else:   # directions x_c u_i (no Cxx^-1/2: not the canonical variates) plus neuron i's mean, orthonormalised by QR,
            # projected on the raw neurons; the mean makes u_i's sign matter: its largest entry is taken positive
        u = u * np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
        directions, _ = np.linalg.qr(centre(x) @ u + x.mean(axis=0)[:u.shape[1]])     # (n, k)
        alpha = np.abs(directions.T @ x).sum(axis=1)
    return float(alpha / alpha.sum() @ rho)


# ----------------------------------------------------------------------------- Table 2: word-embedding spaces

PUBLISHED_TABLE_2 = {("bert-base", "electra-base"): 0.5498, ("bert-base", "clip"): 0.4980,
                     ("electra-base", "clip"): 0.4645, ("bert-base", "random"): 0.3569}
RANDOM_SEED = 0
WORD = re.compile(r"[a-z]+")


def load_space(name, data_root):
    """A checkpoint's input word embeddings (V, H) and the tokenizer that indexes them."""
    path = data.checkpoint_dir(name, data_root)
    encoder = model.from_hf(path)
    clip = isinstance(encoder, model.CLIPTextTransformer)
    table = encoder.token_embedding if clip else encoder.embeddings.word_embeddings
    return table.weight.detach().double().numpy(), (data.clip_tokenizer if clip else data.bert_tokenizer)(path)


def common_words(tokenizers, size=None):
    """Table 2's word list (README): the first `size` [a-z]+ words every tokenizer keeps whole -> words, ids (T, W)."""
    vocabularies = [{w for w in (t.removesuffix("</w>") for t in tok.get_vocab()) if WORD.fullmatch(w)}
                    for tok in tokenizers]
    words = np.array(sorted(set.intersection(*vocabularies)), dtype=object)
    encodings = [tok.encode_batch(list(words), add_special_tokens=False) for tok in tokenizers]
    ids = np.array([[e.ids[0] if len(e.ids) == 1 else -1 for e in enc] for enc in encodings], np.int64)  # -1: split
    kept = (ids >= 0).all(axis=0)
    order = np.argsort(ids[0, kept], kind="stable")[:size]
    return words[kept][order].tolist(), ids[:, kept][:, order]


def table_2(cfg: PWCCAConfig) -> None:
    """Table 2: every pair of the named spaces in order, then the first against RANDOM, over one word list (README)."""
    spaces = [load_space(n, cfg.data) for n in cfg.names]
    words, ids = common_words([tok for _, tok in spaces], cfg.words or None)
    if len(words) < 2:
        raise ValueError(f"the word list of {', '.join(cfg.names)} has {len(words)} words: PWCCA needs more (--words)")
    tables = {n: table[i] for n, (table, _), i in zip(cfg.names, spaces, ids)}          # (W, H) each
    tables["random"] = np.random.default_rng(RANDOM_SEED).standard_normal(spaces[0][0].shape)[ids[0]]
    print(f"Table 2, PWCCA ({cfg.reading} reading) over the {len(words):,} most frequent words all {len(cfg.names)} "
          f"tokenizers keep whole")
    for a, b in [*itertools.combinations(cfg.names, 2), (cfg.names[0], "random")]:
        reference = PUBLISHED_TABLE_2.get((a, b), PUBLISHED_TABLE_2.get((b, a)))
        score = pwcca(tables[a], tables[b], cfg.reading, cfg.epsilon)
        print(f"{a + '/' + (b.upper() if b == 'random' else b):<30} {score:.4f}"
              f"  (Table 2: {'n/a' if reference is None else f'{reference:.4f}'})")


# ----------------------------------------------------------------------------- Fig. 4 / App. D: grounding

# NLTK's English stopwords as BERT's WordPieces, and "also" (App. D's counts leave it out); punctuation: is_stopword
STOPWORDS = frozenset("""
a about above after again against ain all also am an and any are aren as at be because been before being below
between both but by can couldn d did didn do does doesn doing don down during each few for from further had hadn
has hasn have haven having he her here hers herself him himself his how i if in into is isn it its itself just ll
m ma me mightn more most mustn my myself needn no nor not now o of off on once only or other our ours ourselves
out over own re s same shan she should shouldn so some such t than that the their theirs them themselves then
there these they this those through to too under until up ve very was wasn we were weren what when where which
while who whom why will with won wouldn y you your yours yourself yourselves
""".split())
GROUPS = ("improved", "worsened", "unchanged")
FIG_4_STATS = ("Q1", "median", "Q3", "mean")


def wordpieces(tokenizer, texts):
    """Each text's WordPieces, the units App. D counts ("tri ##chet")."""
    return [e.tokens for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def is_stopword(piece):
    """App. D's brackets: a stopword, or punctuation (a piece without a letter or digit)."""
    return piece in STOPWORDS or not any(c.isalnum() for c in piece)


def caption_counts(path, tokenizer):
    """WordPiece counts over the MSCOCO caption annotations ({"annotations": [{"caption": ...}, ...]})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no MSCOCO captions at {path}: run `python download.py coco` or pass --captions FILE")
    with open(path, encoding="utf-8") as f:
        captions = [a["caption"] for a in json.load(f)["annotations"]]
    return Counter(p for pieces in wordpieces(tokenizer, captions) for p in pieces)


def grounded_ratio(pieces, counts, threshold):
    """Sec. 4: the share of a text's non-stopword WordPieces seen over `threshold` times in the captions (or NaN)."""
    content = [p for p in pieces if not is_stopword(p)]
    return sum(counts[p] > threshold for p in content) / len(content) if content else float("nan")


def mark_grounded(pieces, counts, threshold):
    """App. D's rendering: (stopwords) in brackets, *grounded* pieces starred, the rest plain."""
    return " ".join(f"({p})" if is_stopword(p) else f"*{p}*" if counts[p] > threshold else p for p in pieces)


def read_predictions(run):
    """{index: record} of a run's dev_predictions.jsonl (or that file), as finetune.py writes it."""
    path = os.path.join(run, "dev_predictions.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no dev predictions at {path}: finetune the run with `python finetune.py` first")
    with open(path, encoding="utf-8") as f:
        return {r["index"]: r for r in map(json.loads, filter(str.strip, f))}


def summary(ratios):
    """Fig. 4's statistics of one group's ratios: n, quartiles, median, mean (NaN ratios left out)."""
    r = ratios[~np.isnan(ratios)]
    if r.size == 0:
        return {"n": 0}
    return dict(zip(("n", *FIG_4_STATS), (r.size, *np.quantile(r, [0.25, 0.5, 0.75]), r.mean())))


def grounding_analysis(base_runs, adapted_runs, counts, tokenizer, threshold):
    """Fig. 4: per dev example the runs right, WordPieces, grounded ratio and group (Sec. 4: improved if a larger
    share of the adapted runs than of the base runs is right, worsened if smaller); each group's statistics."""
    reference = read_predictions(base_runs[0])
    right = {}
    for side, runs in (("base", base_runs), ("adapted", adapted_runs)):
        right[side] = np.zeros(len(reference), np.int64)
        for run in runs:
            predictions = read_predictions(run)
            if predictions.keys() != reference.keys():
                raise ValueError(f"{run} has predictions for other dev examples than {base_runs[0]}: "
                                 f"use runs of one task")
            right[side] += [predictions[i]["prediction"] == r["label"] for i, r in reference.items()]
    pieces = [wordpieces(tokenizer, filter(None, (r["text_a"], r.get("text_b")))) for r in reference.values()]
    ratios = np.array([grounded_ratio(sum(p, []), counts, threshold) for p in pieces])
    gain = right["adapted"] / len(adapted_runs) - right["base"] / len(base_runs)
    groups = np.select([gain > 0, gain < 0], ["improved", "worsened"], "unchanged")
    return {"records": list(reference.values()), "pieces": pieces, **right, "groups": groups, "ratios": ratios,
            "stats": {g: summary(ratios[groups == g]) for g in GROUPS}}


def grounding(cfg: PWCCAConfig) -> None:
    """Fig. 4 / App. D: each group's statistics, its most changed examples marked as App. D does, and Fig. 4's bars
    of the improved and the worsened examples (Sec. 4 sets the unchanged ones aside)."""
    tokenizer = data.bert_tokenizer(data.checkpoint_dir(cfg.encoder, cfg.data))
    counts = caption_counts(cfg.captions or os.path.join(cfg.data, "coco", "captions_train2017.json"), tokenizer)
    result = grounding_analysis(cfg.base, cfg.adapted, counts, tokenizer, cfg.threshold)
    records, base, adapted = result["records"], result["base"] / len(cfg.base), result["adapted"] / len(cfg.adapted)
    gain = adapted.sum() - base.sum()
    print(f"dev examples: {len(records)}; correct per run: base {base.sum():.2f}, adapted {adapted.sum():.2f} "
          f"({gain:+.2f}, {100 * gain / len(records):+.2f}%)")
    print(f"{'group':<10} {'n':>5}" + "".join(f" {k:>7}" for k in FIG_4_STATS))
    for g, s in result["stats"].items():
        print(f"{g:<10} {s['n']:>5}" + ("".join(f" {s[k]:7.4f}" for k in FIG_4_STATS) if s["n"] else ""))
    order = np.argsort(-np.abs(adapted - base), kind="stable")   # App. D: the most changed examples first
    for g in GROUPS:
        for i in order[result["groups"][order] == g][:cfg.examples]:
            print(f"\n[{g}] index {records[i]['index']}: grounded ratio {result['ratios'][i]:.4f}, base right "
                  f"{result['base'][i]}/{len(cfg.base)}, adapted right {result['adapted'][i]}/{len(cfg.adapted)}")
            print("\n".join("  " + mark_grounded(pieces, counts, cfg.threshold) for pieces in result["pieces"][i]))
    stats = {f"{g} (n={s['n']})": s for g, s in result["stats"].items() if g != "unchanged" and s["n"]}
    if not stats:
        raise ValueError("no dev example was improved or worsened, so there is no Fig. 4 to draw")
    run = os.path.normpath(cfg.adapted[0] if os.path.isdir(cfg.adapted[0]) else os.path.dirname(cfg.adapted[0]))
    path = cfg.svg or os.path.join(os.path.dirname(run), "grounding.svg")
    with model.atomic_file(path, "w") as f:
        f.write(data.svg_bars({k: {g: s[k] for g, s in stats.items()} for k in FIG_4_STATS},
                              "Fig. 4: visually grounded ratio of the dev examples", "visually grounded ratio"))
    print(f"\nFig. 4 chart: {path}")


def parse_args(argv, for_grounding=False) -> PWCCAConfig:
    """The command line over a preset: --toy takes the toy kit's (data/toy, bert-toy, ...), the flags given win."""
    p = argparse.ArgumentParser(prog="pwcca.py" + " grounding" * for_grounding, argument_default=argparse.SUPPRESS)
    p.add_argument("--toy", action="store_true")
    p.add_argument("--data")
    if for_grounding:
        p.add_argument("--base", nargs="+", required=True, help="run dirs (or dev_predictions.jsonl), base model")
        p.add_argument("--adapted", nargs="+", required=True, help="run dirs of the adapted (XDBERT) model")
        for name, kind in (("encoder", str), ("captions", str), ("svg", str), ("threshold", int), ("examples", int)):
            p.add_argument(f"--{name}", type=kind)
    else:
        p.add_argument("names", nargs="*", help="names under DATA/ckpt/ or checkpoint dirs (default Table 2's)")
        p.add_argument("--words", type=int)
        p.add_argument("--epsilon", type=float)
        p.add_argument("--textbook", dest="reading", action="store_const", const="textbook")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}
    return replace(PRESETS["toy" if given.pop("toy", False) else "paper"], **given)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["grounding"]:
            grounding(parse_args(argv[1:], for_grounding=True))
        else:
            table_2(parse_args(argv))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
