"""Sec. 4 analyses: PWCCA between word-embedding spaces (Table 2) and the visually grounded ratio (Fig. 4, App. D).

    python pwcca.py bert-base electra-base          # Table 2: PWCCA over a shared word list
    python pwcca.py bert-base random
    python pwcca.py bert-base runs/a/xdbert         # an adapted XDBERT against its base model
    python pwcca.py grounding --base runs/bert-rte-*/ --adapted runs/xdbert-rte-*/

PWCCA (Morcos et al. 2018) is asymmetric: the projection weights come from the first data set, as in the paper, so
the order of the two names matters (Table 2 lists BERT/CLIP, ELECTRA/CLIP, ...; Google's svcca code instead weights
by whichever set has fewer neurons).

Shared word list rule: lower-case alphabetic words [a-z]+ that both tokenizers encode as exactly one token (one
WordPiece id; one CLIP BPE token "word</w>"). The count is printed with each score.

Grounding input: one file `dev_predictions.jsonl` per finetuning run directory (written by finetune.py), one JSON
object per dev example: {"index": i, "text_a": str, "text_b": str or null, "label": gold, "prediction": predicted}.
"""
import argparse
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
    """An orthonormal basis of the column space of x, via QR then an SVD of R to drop rank-deficient directions.

    Singular values below epsilon times the largest are treated as zero. Returns basis (n, r) and the
    coordinates of x's columns in it, basis.T @ x (r, p).
    """
    q, r = np.linalg.qr(x)                      # (n, m), (m, p) with m = min(n, p)
    u, s, vt = np.linalg.svd(r, full_matrices=False)
    keep = s > epsilon * s[0]
    if not keep.any():
        raise ValueError("a data set is constant over its data points, so it has no canonical directions")
    return q @ u[:, keep], s[keep, None] * vt[keep]     # (n, r), (r, p)


def canonical_correlations(x, y, epsilon=1e-8):
    """CCA of x (n, p) and y (n, q) over the same n data points (rows).

    With orthonormal bases Qx, Qy of the centred data, the singular values of Qx^T Qy are the canonical
    correlations rho_i (descending, k = min(rank x, rank y) of them) and Qx a_i are x's canonical variates h_i.
    Returns rho (k,) and the projections <h_i, x_j> of x's centred neurons on them (k, p).
    """
    qx, x_coords = orthonormal_basis(centre(x), epsilon)
    qy, _ = orthonormal_basis(centre(y), epsilon)
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)    # (rx, k), (k,)
    return np.clip(rho, 0.0, 1.0), a.T @ x_coords               # (k,), (k, p)


def projection_weights(projections):
    """alpha_i = sum_j |<h_i, x_j>|, normalised to sum to 1: the share of x accounted for by each canonical direction."""
    alpha = np.abs(projections).sum(axis=1)
    return alpha / alpha.sum()


def pwcca(x, y, epsilon=1e-8):
    """Projection-weighted CCA (Morcos et al. 2018; Table 2): sum_i alpha_i rho_i, weights from x (n, p)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need two matrices over the same data points (rows), got {x.shape} and {y.shape}")
    rho, projections = canonical_correlations(x, y, epsilon)
    return float(projection_weights(projections) @ rho)


# ----------------------------------------------------------------------------- Table 2: word-embedding spaces

PUBLISHED_TABLE_2 = {("bert-base", "electra-base"): 0.5498, ("bert-base", "clip"): 0.4980,
                     ("electra-base", "clip"): 0.4645, ("bert-base", "random"): 0.3569}
TOY_NAMES = {"bert-base": "bert-toy", "electra-base": "electra-toy", "clip": "clip-toy"}
RANDOM_SEED = 0
WORD = re.compile(r"[a-z]+")


def load_space(name, data_root, bert_name):
    """Input word embeddings (V, H) and the tokenizer that indexes them (Table 2).

    "random" is a seeded standard-normal table of BERT's vocabulary size and width, indexed by BERT's tokenizer.
    """
    if name == "random":
        config = model.PRESETS[bert_name]
        table = np.random.default_rng(RANDOM_SEED).standard_normal((config.vocab_size, config.hidden_size))
        return table, data.bert_tokenizer(data.checkpoint_dir(bert_name, data_root))
    path = data.checkpoint_dir(name, data_root)
    encoder = model.from_hf(path)
    if isinstance(encoder, model.CLIPTextTransformer):
        return encoder.token_embedding.weight.detach().double().numpy(), data.clip_tokenizer(path)
    return encoder.embeddings.word_embeddings.weight.detach().double().numpy(), data.bert_tokenizer(path)


def vocabulary_words(tokenizer):
    """Lower-case alphabetic entries of a vocabulary, CLIP's end-of-word suffix "</w>" removed."""
    return {w for w in (t.removesuffix("</w>") for t in tokenizer.get_vocab()) if WORD.fullmatch(w)}


def single_token_ids(tokenizer, words):
    """For each word, its one token id, or None when the tokenizer splits it."""
    encodings = tokenizer.encode_batch(words, add_special_tokens=False)
    return [e.ids[0] if len(e.ids) == 1 else None for e in encodings]


def shared_words(tokenizer_a, tokenizer_b):
    """The shared word list: [a-z]+ words that are exactly one token in both vocabularies, with both ids."""
    candidates = sorted(vocabulary_words(tokenizer_a) & vocabulary_words(tokenizer_b))
    pairs = zip(candidates, single_token_ids(tokenizer_a, candidates), single_token_ids(tokenizer_b, candidates))
    kept = [(w, i, j) for w, i, j in pairs if i is not None and j is not None]
    words, ids_a, ids_b = zip(*kept) if kept else ((), (), ())
    return list(words), np.array(ids_a, np.int64), np.array(ids_b, np.int64)


def published(name_a, name_b):
    """Table 2's value for this pair (in either order), or None."""
    return PUBLISHED_TABLE_2.get((name_a, name_b), PUBLISHED_TABLE_2.get((name_b, name_a)))


def embeddings_main(argv):
    parser = argparse.ArgumentParser(prog="pwcca.py", description="Table 2: PWCCA between two input word-embedding "
                                     "spaces over their shared single-token words (weights from the first).")
    parser.add_argument("first", help="bert-base, electra-base, clip, random, a name under DATA/ckpt/ or a dir")
    parser.add_argument("second")
    parser.add_argument("--data", default="data")
    parser.add_argument("--toy", action="store_true", help="--data data/toy and the toy models for the names")
    parser.add_argument("--epsilon", type=float, default=1e-8, help="relative singular-value cut-off for rank")
    args = parser.parse_args(argv)
    data_root, names = args.data, [args.first, args.second]
    if args.toy:
        data_root, names = os.path.join("data", "toy"), [TOY_NAMES.get(n, n) for n in names]
    bert_name = "bert-toy" if args.toy else "bert-base"
    try:
        (table_a, tok_a), (table_b, tok_b) = (load_space(n, data_root, bert_name) for n in names)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    words, ids_a, ids_b = shared_words(tok_a, tok_b)
    if len(words) < 2:
        raise SystemExit(f"{names[0]} and {names[1]} share {len(words)} single-token words: PWCCA needs more")
    score = pwcca(table_a[ids_a], table_b[ids_b], args.epsilon)     # (W, Ha), (W, Hb)
    reference = published(args.first, args.second)
    print(f"shared single-token words: {len(words)}")
    print(f"PWCCA {names[0]}/{names[1]}: {score:.4f}"
          f"  (Table 2: {'n/a' if reference is None else f'{reference:.4f}'})")


# ----------------------------------------------------------------------------- Fig. 4 / App. D: grounding

COCO_THRESHOLD = 100   # App. D (after Tan and Bansal 2020): grounded = more than 100 occurrences in MSCOCO captions
TOKEN = re.compile(r"[a-z]+|[0-9]+")   # lower-cased words; numbers count as tokens, as "march 2001" does in App. D
# NLTK's English stopword list (alphabetic pieces, apostrophes split as TOKEN splits them) plus "also" (bracketed
# as a stopword in App. D).
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


def tokens(text):
    """Lower-cased word and number tokens of a text (punctuation dropped)."""
    return TOKEN.findall(text.lower())


def caption_counts(path):
    """Token counts over the MSCOCO caption annotations ({"annotations": [{"caption": ...}, ...]})."""
    if not os.path.isfile(path):
        raise SystemExit(f"no MSCOCO captions at {path}: run `python download.py coco` or pass --captions FILE")
    with open(path, encoding="utf-8") as f:
        annotations = json.load(f)["annotations"]
    return Counter(t for a in annotations for t in tokens(a["caption"]))


def grounded_ratio(text, counts, threshold):
    """Sec. 4: the share of a text's non-stopword tokens occurring more than `threshold` times in the captions.

    NaN for a text without non-stopword tokens.
    """
    content = [t for t in tokens(text) if t not in STOPWORDS]
    if not content:
        return float("nan")
    return sum(counts[t] > threshold for t in content) / len(content)


def mark_grounded(text, counts, threshold):
    """App. D rendering: *grounded* words starred, (stopwords) in brackets, the rest plain."""
    def mark(match):
        t = match.group(0)
        return f"({t})" if t in STOPWORDS else f"*{t}*" if counts[t] > threshold else t
    return TOKEN.sub(mark, text.lower())


def read_predictions(run):
    """One run's dev predictions, {index: record}, from run/dev_predictions.jsonl (or the file itself)."""
    path = os.path.join(run, "dev_predictions.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"no dev predictions at {path}: finetune the run with `python finetune.py` first")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["index"]: r for r in records}


def correct_counts(runs, reference):
    """Per dev example, the number of runs that predicted its gold label: (N,) in the order of reference's keys."""
    counts = np.zeros(len(reference), np.int64)
    for run in runs:
        predictions = read_predictions(run)
        if predictions.keys() != reference.keys():
            raise SystemExit(f"{run} has predictions for other dev examples than {runs[0]}: use runs of one task")
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


def grounding_analysis(base_runs, adapted_runs, counts, threshold=COCO_THRESHOLD):
    """Fig. 4: per example correct-run counts, group and grounded ratio, and each group's statistics."""
    reference = read_predictions(base_runs[0])
    base, adapted = correct_counts(base_runs, reference), correct_counts(adapted_runs, reference)
    texts = [" ".join(filter(None, (r["text_a"], r.get("text_b")))) for r in reference.values()]
    ratios = np.array([grounded_ratio(t, counts, threshold) for t in texts])
    groups = group(base / len(base_runs), adapted / len(adapted_runs))
    return {"records": list(reference.values()), "base": base, "adapted": adapted, "groups": groups,
            "ratios": ratios, "stats": {g: summary(ratios[groups == g]) for g in GROUPS}}


def print_report(result, n_base, n_adapted, counts, threshold, n_examples):
    records, base, adapted = result["records"], result["base"], result["adapted"]
    gain = adapted.sum() / n_adapted - base.sum() / n_base
    print(f"dev examples: {len(records)}; correct per run: base {base.sum() / n_base:.2f}, "
          f"adapted {adapted.sum() / n_adapted:.2f} ({gain:+.2f}, {100 * gain / len(records):+.2f}%)")
    print(f"{'group':<10} {'n':>5} {'Q1':>7} {'median':>7} {'Q3':>7} {'mean':>7}")
    for g, s in result["stats"].items():
        cells = "".join(f" {s[k]:7.4f}" for k in ("q1", "median", "q3", "mean")) if s["n"] else ""
        print(f"{g:<10} {s['n']:>5}{cells}")
    margin = adapted / n_adapted - base / n_base
    for g in GROUPS:
        order = np.argsort(-np.abs(margin), kind="stable")      # App. D: the most extreme examples first
        chosen = [i for i in order if result["groups"][i] == g][:n_examples]
        for i in chosen:
            r = records[i]
            print(f"\n[{g}] index {r['index']}: grounded ratio {result['ratios'][i]:.4f}, "
                  f"base right {base[i]}/{n_base}, adapted right {adapted[i]}/{n_adapted}")
            for text in filter(None, (r["text_a"], r.get("text_b"))):
                print("  " + mark_grounded(text, counts, threshold))


def grounding_main(argv):
    parser = argparse.ArgumentParser(prog="pwcca.py grounding", description="Fig. 4 / App. D: visually grounded "
                                     "ratio of the dev examples the adapted runs improved, worsened or left unchanged (classification tasks: "
                                     "RTE, MRPC, CoLA in Sec. 4).")
    parser.add_argument("--base", nargs="+", required=True, help="run dirs (or dev_predictions.jsonl) of the base model")
    parser.add_argument("--adapted", nargs="+", required=True, help="run dirs of the adapted (XDBERT) model")
    parser.add_argument("--data", default="data")
    parser.add_argument("--toy", action="store_true", help="--data data/toy")
    parser.add_argument("--captions", help="MSCOCO captions json (default DATA/coco/captions_train2017.json)")
    parser.add_argument("--threshold", type=int, default=COCO_THRESHOLD, help="grounded: more caption occurrences than this")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per group (App. D)")
    args = parser.parse_args(argv)
    data_root = os.path.join("data", "toy") if args.toy else args.data
    counts = caption_counts(args.captions or os.path.join(data_root, "coco", "captions_train2017.json"))
    result = grounding_analysis(args.base, args.adapted, counts, args.threshold)
    print_report(result, len(args.base), len(args.adapted), counts, args.threshold, args.examples)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grounding"]:
        grounding_main(argv[1:])
    else:
        embeddings_main(argv)


if __name__ == "__main__":
    main()
