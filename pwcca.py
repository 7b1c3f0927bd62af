"""Sec. 4 analyses: PWCCA between input word-embedding spaces (Table 2), the visually grounded ratio (Fig. 4, App. D).

    python pwcca.py                                  # Table 2: BERT/ELECTRA, BERT/CLIP, ELECTRA/CLIP, BERT/RANDOM
    python pwcca.py bert-base runs/a/xdbert          # any spaces: every pair in order, then the first against RANDOM
    python pwcca.py --textbook --words 0             # Morcos et al.'s own PWCCA over every shared word
    python pwcca.py grounding --base runs/bert-rte-*/ --adapted runs/xdbert-rte-*/ [--svg fig4.svg]

PWCCA's two readings (svcca's, the default, and --textbook), the word list and the pictures: see the README.

Grounding input: one file `dev_predictions.jsonl` per finetuning run directory (written by finetune.py), one JSON
object per dev example: {"index": i, "text_a": str, "text_b": str or null, "label": gold, "prediction": predicted}.
"""
import argparse
import itertools
import json
import os
import re
import sys
from collections import Counter

import numpy as np

import data
import model

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
    """CCA of x (n, p) and y (n, q) over the same n data points (rows).

    With centred x = Qx diag(s) V^T and Qy likewise, the singular values of Qx^T Qy = A diag(rho) B^T are the canonical
    correlations rho_i (descending, k = min(rank x, rank y) of them); h_i = Qx a_i are x's canonical variates (unit
    norm) and u_i = V a_i the left singular vectors of Cxx^-1/2 Cxy Cyy^-1/2. Returns rho (k,), h (n, k), u (p, k).
    """
    qx, vx = orthonormal_basis(centre(x), epsilon)
    qy, _ = orthonormal_basis(centre(y), epsilon)
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)      # (rx, k), (k,)
    return np.clip(rho, 0.0, 1.0), qx @ a, vx @ a


def textbook_weights(x, h, u):
    """Morcos et al. 2018: alpha_i = sum_j |<h_i, x_j>| over x's centred neurons x_j."""
    return np.abs(h.T @ centre(x)).sum(axis=1)


def svcca_weights(x, h, u):
    """Table 2's reading (svcca's compute_pwcca): directions x_c u_i (no Cxx^-1/2, so not the canonical variates)
    plus neuron i's mean, orthonormalised by QR; alpha_i sums |<direction_i, x_j>| over the raw, uncentred neurons.
    The mean makes the sign of u_i matter: each u_i is taken with its largest entry positive."""
    u = u * np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    directions, _ = np.linalg.qr(centre(x) @ u + x.mean(axis=0)[:u.shape[1]])     # (n, k)
    return np.abs(directions.T @ x).sum(axis=1)


def pwcca(x, y, reading="svcca", epsilon=1e-8):
    """Projection-weighted CCA (Morcos et al. 2018; Table 2): sum_i alpha_i rho_i between x (n, p) and y (n, q).

    "svcca" takes the weights from the set with fewer neurons (x on a tie), "textbook" from x.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need two matrices over the same data points (rows), got {x.shape} and {y.shape}")
    if reading == "svcca" and y.shape[1] < x.shape[1]:
        x, y = y, x          # svcca's second branch, meant to use acts2 (its code reads acts1 there)
    rho, h, u = canonical_correlations(x, y, epsilon)
    alpha = (textbook_weights if reading == "textbook" else svcca_weights)(x, h, u)
    return float(alpha / alpha.sum() @ rho)


# ----------------------------------------------------------------------------- Table 2: word-embedding spaces

PUBLISHED_TABLE_2 = {("bert-base", "electra-base"): 0.5498, ("bert-base", "clip"): 0.4980,
                     ("electra-base", "clip"): 0.4645, ("bert-base", "random"): 0.3569}
TABLE_2_NAMES = ("bert-base", "electra-base", "clip")
TOY_NAMES = {"bert-base": "bert-toy", "electra-base": "electra-toy", "clip": "clip-toy"}
# The paper does not give its word list. Two independent random 768-wide spaces score 0.367 (svcca; textbook 0.357)
# over 4,500 words, near the paper's BERT/RANDOM 0.3569, but 0.18 over all 17,952 words BERT and CLIP keep whole.
TABLE_2_WORDS = 4500
RANDOM_SEED = 0
WORD = re.compile(r"[a-z]+")


def load_space(name, data_root):
    """A checkpoint's input word embeddings (V, H) and the tokenizer that indexes them (Table 2)."""
    path = data.checkpoint_dir(name, data_root)
    encoder = model.from_hf(path)
    if isinstance(encoder, model.CLIPTextTransformer):
        return encoder.token_embedding.weight.detach().double().numpy(), data.clip_tokenizer(path)
    return encoder.embeddings.word_embeddings.weight.detach().double().numpy(), data.bert_tokenizer(path)


def single_token_ids(tokenizer, words):
    """For each word, its one token id, or -1 where the tokenizer splits it: (W,)."""
    encodings = tokenizer.encode_batch(words, add_special_tokens=False)
    return np.array([e.ids[0] if len(e.ids) == 1 else -1 for e in encodings], np.int64)


def common_words(tokenizers, size=None):
    """Table 2's word list: the [a-z]+ words every tokenizer keeps whole, most frequent first (by their id in the
    first tokenizer's vocabulary), the first `size` of them. Returns the words and their ids in each tokenizer, (T, W).
    """
    vocabularies = [{w for w in (t.removesuffix("</w>") for t in tok.get_vocab()) if WORD.fullmatch(w)}
                    for tok in tokenizers]
    words = np.array(sorted(set.intersection(*vocabularies)), dtype=object)
    ids = np.stack([single_token_ids(tok, list(words)) for tok in tokenizers])      # (T, all words)
    kept = (ids >= 0).all(axis=0)
    order = np.argsort(ids[0, kept], kind="stable")[:size]
    return words[kept][order].tolist(), ids[:, kept][:, order]


def table_2(names, data_root, size, reading, epsilon):
    """Table 2's rows: every pair of the named spaces in order, then the first against RANDOM (a seeded
    standard-normal table of the first space's shape), all over one common word list."""
    spaces = [load_space(n, data_root) for n in names]
    words, ids = common_words([tok for _, tok in spaces], size)
    if len(words) < 2:
        raise ValueError(f"the word list of {', '.join(names)} has {len(words)} words: PWCCA needs more (--words)")
    tables = {n: table[i] for n, (table, _), i in zip(names, spaces, ids)}          # (W, H) each
    tables["random"] = np.random.default_rng(RANDOM_SEED).standard_normal(spaces[0][0].shape)[ids[0]]
    print(f"Table 2, PWCCA ({reading} reading) over the {len(words):,} most frequent words all {len(names)} "
          f"tokenizers keep whole")
    for a, b in [*itertools.combinations(names, 2), (names[0], "random")]:
        reference = PUBLISHED_TABLE_2.get((a, b), PUBLISHED_TABLE_2.get((b, a)))
        print(f"{a + '/' + (b.upper() if b == 'random' else b):<30} {pwcca(tables[a], tables[b], reading, epsilon):.4f}"
              f"  (Table 2: {'n/a' if reference is None else f'{reference:.4f}'})")


def embeddings_main(argv):
    parser = argparse.ArgumentParser(prog="pwcca.py", description="Table 2: PWCCA between input word-embedding "
                                     "spaces over one common word list, each pair and the first against RANDOM.")
    parser.add_argument("names", nargs="*", help="bert-base, electra-base, clip, a name under DATA/ckpt/ or a dir "
                        "(default: Table 2's bert-base electra-base clip)")
    parser.add_argument("--data", help="data root (default data, or data/toy with --toy)")
    parser.add_argument("--toy", action="store_true", help="the toy kit: bert-toy, electra-toy, clip-toy as names")
    parser.add_argument("--words", type=int, default=TABLE_2_WORDS, help="the N most frequent shared words (0: all)")
    parser.add_argument("--textbook", action="store_true", help="Morcos et al.'s PWCCA instead of svcca's reading")
    parser.add_argument("--epsilon", type=float, default=1e-8, help="relative singular-value cut-off for rank")
    args = parser.parse_args(argv)
    names = [TOY_NAMES.get(n, n) if args.toy else n for n in args.names or TABLE_2_NAMES]
    data_root = args.data or ("data/toy" if args.toy else "data")
    table_2(names, data_root, args.words or None, "textbook" if args.textbook else "svcca", args.epsilon)


# ----------------------------------------------------------------------------- Fig. 4 / App. D: grounding

COCO_THRESHOLD = 100   # App. D (after Tan and Bansal 2020): grounded = more than 100 occurrences in MSCOCO captions
# NLTK's English stopword list (WordPieces: apostrophes split as BERT splits them) plus "also" (App. D's counts leave
# it out); punctuation is a stopword too (is_stopword).
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
FIG_4_STATS = {"q1": "Q1", "median": "median", "q3": "Q3", "mean": "mean"}


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
    """Sec. 4: the share of a text's non-stopword WordPieces occurring more than `threshold` times in the captions.

    NaN for a text without non-stopword pieces.
    """
    content = [p for p in pieces if not is_stopword(p)]
    return sum(counts[p] > threshold for p in content) / len(content) if content else float("nan")


def mark_grounded(pieces, counts, threshold):
    """App. D's rendering: (stopwords) in brackets, *grounded* pieces starred, the rest plain."""
    return " ".join(f"({p})" if is_stopword(p) else f"*{p}*" if counts[p] > threshold else p for p in pieces)


def read_predictions(run):
    """One run's dev predictions, {index: record}, from run/dev_predictions.jsonl (or the file itself)."""
    path = os.path.join(run, "dev_predictions.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no dev predictions at {path}: finetune the run with `python finetune.py` first")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["index"]: r for r in records}


def correct_counts(runs, reference):
    """Per dev example, the number of runs that predicted its gold label: (N,) in the order of reference's keys."""
    counts = np.zeros(len(reference), np.int64)
    for run in runs:
        predictions = read_predictions(run)
        if predictions.keys() != reference.keys():
            raise ValueError(f"{run} has predictions for other dev examples than {runs[0]}: use runs of one task")
        counts += [predictions[i]["prediction"] == r["label"] for i, r in reference.items()]
    return counts


def group(base_share, adapted_share):
    """Sec. 4: an example is improved (a larger share of the adapted runs right), worsened (smaller) or unchanged."""
    return np.where(adapted_share > base_share, "improved",
                    np.where(adapted_share < base_share, "worsened", "unchanged"))


def summary(ratios):
    """Fig. 4's statistics of one group's ratios: n, quartiles, median, mean (NaN ratios left out)."""
    r = ratios[~np.isnan(ratios)]
    if r.size == 0:
        return {"n": 0}
    q1, median, q3 = np.quantile(r, [0.25, 0.5, 0.75])
    return {"n": int(r.size), "q1": q1, "median": median, "q3": q3, "mean": float(r.mean())}


def grounding_analysis(base_runs, adapted_runs, counts, tokenizer, threshold=COCO_THRESHOLD):
    """Fig. 4: per example correct-run counts, WordPieces per text, group and grounded ratio; group statistics."""
    reference = read_predictions(base_runs[0])
    base, adapted = correct_counts(base_runs, reference), correct_counts(adapted_runs, reference)
    pieces = [wordpieces(tokenizer, filter(None, (r["text_a"], r.get("text_b")))) for r in reference.values()]
    ratios = np.array([grounded_ratio(sum(p, []), counts, threshold) for p in pieces])
    groups = group(base / len(base_runs), adapted / len(adapted_runs))
    return {"records": list(reference.values()), "pieces": pieces, "base": base, "adapted": adapted,
            "groups": groups, "ratios": ratios, "stats": {g: summary(ratios[groups == g]) for g in GROUPS}}


def fig_4_svg(stats):
    """Fig. 4 as grouped bars: each statistic of the ratio for the improved and the worsened examples (the unchanged
    ones are set aside, as in Sec. 4)."""
    shown = [g for g in ("improved", "worsened") if stats[g]["n"]]
    if not shown:
        raise ValueError("no dev example was improved or worsened, so there is no Fig. 4 to draw")
    bars = {label: {f"{g} (n={stats[g]['n']})": stats[g][key] for g in shown} for key, label in FIG_4_STATS.items()}
    return data.svg_bars(bars, "Fig. 4: visually grounded ratio of the dev examples", "visually grounded ratio")


def print_report(result, n_base, n_adapted, counts, threshold, n_examples):
    records, base, adapted = result["records"], result["base"], result["adapted"]
    gain = adapted.sum() / n_adapted - base.sum() / n_base
    print(f"dev examples: {len(records)}; correct per run: base {base.sum() / n_base:.2f}, "
          f"adapted {adapted.sum() / n_adapted:.2f} ({gain:+.2f}, {100 * gain / len(records):+.2f}%)")
    print(f"{'group':<10} {'n':>5} {'Q1':>7} {'median':>7} {'Q3':>7} {'mean':>7}")
    for g, s in result["stats"].items():
        cells = "".join(f" {s[k]:7.4f}" for k in FIG_4_STATS) if s["n"] else ""
        print(f"{g:<10} {s['n']:>5}{cells}")
    order = np.argsort(-np.abs(adapted / n_adapted - base / n_base), kind="stable")   # App. D: most extreme first
    for g in GROUPS:
        for i in [i for i in order if result["groups"][i] == g][:n_examples]:
            print(f"\n[{g}] index {records[i]['index']}: grounded ratio {result['ratios'][i]:.4f}, "
                  f"base right {base[i]}/{n_base}, adapted right {adapted[i]}/{n_adapted}")
            for pieces in result["pieces"][i]:
                print("  " + mark_grounded(pieces, counts, threshold))


def grounding_main(argv):
    parser = argparse.ArgumentParser(prog="pwcca.py grounding", description="Fig. 4 / App. D: visually grounded "
                                     "ratio of the dev examples the adapted runs improved, worsened or left unchanged "
                                     "(classification tasks: RTE, MRPC, CoLA in Sec. 4).")
    parser.add_argument("--base", nargs="+", required=True, help="run dirs (or dev_predictions.jsonl), base model")
    parser.add_argument("--adapted", nargs="+", required=True, help="run dirs of the adapted (XDBERT) model")
    parser.add_argument("--data", help="data root (default data, or data/toy with --toy)")
    parser.add_argument("--toy", action="store_true", help="the toy kit: bert-toy's WordPieces")
    parser.add_argument("--encoder", help="checkpoint whose WordPieces are counted (default bert-base; --toy bert-toy)")
    parser.add_argument("--captions", help="MSCOCO captions json (default DATA/coco/captions_train2017.json)")
    parser.add_argument("--threshold", type=int, default=COCO_THRESHOLD, help="grounded: more caption occurrences")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per group (App. D)")
    parser.add_argument("--svg", help="Fig. 4 bar chart (default grounding.svg in the folder of the adapted runs)")
    args = parser.parse_args(argv)
    data_root = args.data or ("data/toy" if args.toy else "data")
    tokenizer = data.bert_tokenizer(data.checkpoint_dir(args.encoder or ("bert-toy" if args.toy else "bert-base"),
                                                        data_root))
    counts = caption_counts(args.captions or os.path.join(data_root, "coco", "captions_train2017.json"), tokenizer)
    result = grounding_analysis(args.base, args.adapted, counts, tokenizer, args.threshold)
    print_report(result, len(args.base), len(args.adapted), counts, args.threshold, args.examples)
    run = os.path.normpath(args.adapted[0] if os.path.isdir(args.adapted[0]) else os.path.dirname(args.adapted[0]))
    path = args.svg or os.path.join(os.path.dirname(run), "grounding.svg")
    with model.atomic_file(path, "w") as f:
        f.write(fig_4_svg(result["stats"]))
    print(f"\nFig. 4 chart: {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["grounding"]:
            grounding_main(argv[1:])
        else:
            embeddings_main(argv)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
