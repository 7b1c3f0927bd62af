"""Finetuning XDBERT and its baselines on GLUE, SWAG and READ (Sec. 2.4, 3, App. C.2, C.3).

    python finetune.py rte --encoder bert-base              # or a path to an adapted runs/<run>/xdbert
    python finetune.py rte --toy                            # the toy kit: seconds on 2 CPU cores
    python finetune.py rte --encoder runs/<run>/xdbert --full-model   # App. C.3: the whole cross-modal model
    python finetune.py sst2 --encoder clip                  # Table 1's CLIP-T row
    python finetune.py table runs/*/results.json            # a table like the paper's Table 1
    python finetune.py bench                                # finetuning examples/s, random weights

Recipe (App. C.2, Table 5): AdamW, learning rate 1e-4 for RTE, MRPC and STS-B and 2e-5 for the other tasks on
base-sized encoders (5e-5 and 1e-5 on large ones), 10% linear warm-up then linear decay to 0, 3 epochs, maximum
length 128, batch 32 (the authors ran 4 x 8 accumulation: `--grad-accum`), weight decay 0, dropout 0.1, gradient
clipping 1.0 (the Hugging Face Trainer default the authors' script ran with). Median of 5 seeds, 9 for RTE.

The paper's "learning rate decay of 0.9" is ambiguous: it reads like ELECTRA's layer-wise decay (Clark et al.
2020), yet the authors' BERT script used a plain linear schedule. The default here is the plain schedule;
`--layer-decay 0.9` switches on ELECTRA's rule (`_get_layer_lrs` in google-research/electra): the embeddings
have depth 0, transformer layer i depth i + 1, the task head (and BERT's pooler) depth L + 2, and a parameter
of depth d trains at lr * decay ** (L + 2 - d).

Heads (written here, not in model.py, because finetuning alone uses them):
- BERT: the pooled [CLS] (the pretrained dense + tanh pooler) -> dropout -> linear (Devlin et al. 2019).
- ELECTRA has no pooler: [CLS] -> dropout -> dense -> GELU -> dropout -> linear, the convention of Hugging Face's
  ElectraClassificationHead (the original ELECTRA code put the linear layer on [CLS] directly).
- Regression (STS-B, READ): the same head with one output, mean squared error.
- Multiple choice (SWAG): each of the 4 (context, ending) pairs is scored by the head with one output; the
  softmax (cross-entropy) runs over the 4 scores of one example.
- CLIP-T alone: CLIP's pooled end-of-text output (after the text projection) of every 77-token block, averaged
  over the non-empty blocks of each sentence (2 blocks per sentence, App. B), the sentences concatenated ->
  dropout -> linear. The paper does not say how CLIP-T read sentence pairs; this is the reading adopted here.
- Full model (App. C.3): the cross-modal transformer's pooled [CLS] (its MATCH pooler) -> dropout -> linear, with
  2 CLIP blocks per sentence: (B, 2, 77) for one sentence, (B, 4, 77) for a pair (App. B).

Outputs of one seed, in OUT/<task>-<model>-seed<k>/ (OUT = --out, default runs): results.json (dev metrics after
every epoch and at the end, hyper-parameters, speed), dev_predictions.jsonl (one {"index", "text_a", "text_b",
"label", "prediction"} per dev example in file order; MNLI adds dev_mismatched_predictions.jsonl) and, when the
GLUE test file is there, glue_test/<Task>.tsv in the submission format (MNLI-m.tsv, MNLI-mm.tsv and AX.tsv for MNLI).
Every file is written to a .tmp name first and renamed. The median of several seeds is the run whose main metric
(the task's first) is the median, so that all metrics of a row come from one seed.
--toy finetunes the toy kit's random-weight encoders, so it defaults to a larger learning rate (TOY_LR) and 3 seeds.

Metrics are written here with numpy. Degenerate inputs give defined values instead of NaN: Pearson and Spearman
are 0.0 when either side is constant (fewer than 2 distinct values), Matthews correlation is 0.0 when a
marginal is degenerate (one class only in labels or predictions, as scikit-learn does), F1 is 0.0 when there is
no positive label and no positive prediction (scikit-learn's zero_division=0). Empty or non-finite inputs raise
ValueError.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model

TASK_ORDER = ("rte", "mrpc", "stsb", "cola", "sst2", "qnli", "qqp", "mnli", "wnli", "swag", "read")
SMALL_TASKS = ("rte", "mrpc", "stsb")  # Table 5: the higher learning rate
LEARNING_RATES = {"base": {"small": 1e-4, "other": 2e-5}, "large": {"small": 5e-5, "other": 1e-5}}  # Table 5
DEFAULT_SEEDS = {"rte": 9}  # App. C.2: median of 9 runs for RTE, 5 for the others
TOY_SEEDS = 3
TOY_LR = 3e-3  # --toy: the toy encoders have random weights (download.py --toy), Table 5's rates barely move them
# GLUE submission (sources.md 1): file name per task and dev/test suffix; label strings for these tasks.
SUBMISSION_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
                    "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
STRING_LABEL_TASKS = ("mnli", "qnli", "rte")


# ---------------------------------------------------------------------------------------------------- metrics

def _vectors(labels, predictions, classes):
    y, p = np.asarray(labels, dtype=np.float64).ravel(), np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions: score the same examples")
    if y.size == 0:
        raise ValueError("no examples to score: the dev set is empty")
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        raise ValueError("labels or predictions contain NaN or inf: training diverged, try a lower --lr")
    if classes and not (np.array_equal(y, np.round(y)) and np.array_equal(p, np.round(p))):
        raise ValueError("classification metrics take class ids, and these labels or predictions are not whole "
                         "numbers: score regression outputs with pearson, spearman or rmse")
    return (y.astype(np.int64), p.astype(np.int64)) if classes else (y, p)


def accuracy(labels, predictions) -> float:
    """Share of exact matches."""
    y, p = _vectors(labels, predictions, True)
    return float(np.mean(y == p))


def f1(labels, predictions, positive=1) -> float:
    """Binary F1 of the positive class, 2 tp / (2 tp + fp + fn); 0.0 when there is no positive at all."""
    y, p = _vectors(labels, predictions, True)
    tp = np.sum((y == positive) & (p == positive))
    wrong = np.sum((y == positive) != (p == positive))
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews(labels, predictions) -> float:
    """Matthews correlation (multi-class, Gorodkin 2004) from the confusion matrix; 0.0 if a marginal is degenerate."""
    y, p = _vectors(labels, predictions, True)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (codes[:y.size], codes[y.size:]), 1)
    true_counts, pred_counts = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), np.trace(confusion)
    cov_yp = correct * n - true_counts @ pred_counts
    cov_yy, cov_pp = n * n - true_counts @ true_counts, n * n - pred_counts @ pred_counts
    return float(cov_yp / math.sqrt(cov_yy * cov_pp)) if cov_yy * cov_pp > 0 else 0.0


def pearson(labels, predictions) -> float:
    """Pearson correlation; exactly 0.0 when either side is constant (tested before centring, whose rounding
    residue would otherwise correlate perfectly)."""
    y, p = _vectors(labels, predictions, False)
    if np.ptp(y) == 0 or np.ptp(p) == 0:
        return 0.0
    y, p = y - y.mean(), p - p.mean()
    return float(np.clip((y @ p) / math.sqrt(float(y @ y) * float(p @ p)), -1.0, 1.0))


def average_ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (scipy.stats.rankdata's 'average')."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.ravel()]


def spearman(labels, predictions) -> float:
    """Spearman correlation: Pearson of the average ranks; 0.0 when either side is constant."""
    y, p = _vectors(labels, predictions, False)
    return pearson(average_ranks(y), average_ranks(p))


def rmse(labels, predictions) -> float:
    """Root mean squared error (READ)."""
    y, p = _vectors(labels, predictions, False)
    return float(np.sqrt(np.mean((y - p) ** 2)))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews, "pearson": pearson, "spearman": spearman, "rmse": rmse}


def score(task, labels, predictions) -> dict:
    """The task's metrics (data.TASKS[task].metrics) on one dev split, as fractions (RMSE in target units)."""
    return {name: METRICS[name](labels, predictions) for name in data.TASKS[task].metrics}


def median_run(runs: list[dict]) -> dict:
    """Sec. 3's median of several seeds: the run whose main metric is the median (for an even count the worse of the
    two middle runs), so that every metric reported comes from that one run."""
    def quality(r):
        value = r["metrics"][r["main_metric"]]
        return -value if r["main_metric"].startswith("rmse") else value
    return sorted(runs, key=lambda r: (quality(r), r["seed"]))[(len(runs) - 1) // 2]


# ---------------------------------------------------------------------------------------------------- heads

class Head(nn.Module):
    """features (B, D) -> dropout -> linear -> (B, outputs); ELECTRA's convention puts dense + GELU first."""

    def __init__(self, dim, outputs, dropout, electra=False):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim) if electra else None
        self.out = nn.Linear(dim, outputs)
        self.apply(model.init_weights)

    def forward(self, x):
        if self.dense is not None:
            x = F.gelu(self.dense(self.drop(x)))
        return self.out(self.drop(x))


class Finetuner(nn.Module):
    """A backbone (LanguageEncoder, CLIPTextTransformer or CrossModalTransformer) with a task head (Sec. 2.4).

    forward(batch) -> classification logits (B, C), regression scores (B,) or choice scores (B, 4).
    """

    def __init__(self, backbone, kind, num_labels, dropout=0.1, sentences=1):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        outputs = num_labels if kind == "classification" else 1
        electra = False
        if isinstance(backbone, model.CrossModalTransformer):
            dim = backbone.language.config.hidden_size
            if "match" in backbone.tasks:
                self.pooler = backbone.match_pooler  # App. C.3: the cross-modal [CLS] pooler MATCH trained
            else:
                self.pooler = model.Pooler(dim)  # adapted without MATCH: a fresh pooler
                self.pooler.apply(model.init_weights)
        elif isinstance(backbone, model.CLIPTextTransformer):
            dim = backbone.config.projection_dim * sentences
        else:
            dim = backbone.config.hidden_size
            electra = backbone.pooler is None
        self.head = Head(dim, outputs, dropout, electra)

    def features(self, b):
        """One (B, D) vector per input: pooled [CLS], ELECTRA's [CLS], CLIP-T's pooled blocks or cross-modal [CLS]."""
        bb = self.backbone
        if isinstance(bb, model.CLIPTextTransformer):
            B, n, C = b["clip_ids"].shape
            _, pooled = bb(b["clip_ids"].reshape(B * n, C))  # (B, n, 77) -> (B*n, 77) -> pooled (B*n, P)
            pooled = pooled.reshape(B, n // 2, 2, -1)  # -> (B, sentences, 2 blocks, P)
            used = (b["clip_mask"].sum(-1) > 0).reshape(B, n // 2, 2, 1).to(pooled.dtype)
            per_sentence = (pooled * used).sum(2) / used.sum(2).clamp(min=1)  # (B, sentences, P)
            return per_sentence.flatten(1)  # (B, sentences * P)
        if isinstance(bb, model.CrossModalTransformer):
            lang, _ = bb.encode(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["clip_ids"],
                                b["clip_mask"])
            return self.pooler(lang)  # (B, T, H) -> (B, H)
        hidden, pooled = bb(b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"])
        return pooled if pooled is not None else hidden[:, 0]  # ELECTRA: [CLS] (B, H) into its dense + GELU head

    def forward(self, b):
        if self.kind == "choice":  # SWAG: (B, 4, ...) -> (B*4, ...), one score per (context, ending) pair
            B = b["input_ids"].shape[0] if "input_ids" in b else b["clip_ids"].shape[0]
            flat = {k: v.flatten(0, 1) for k, v in b.items() if k != "labels"}
            return self.head(self.features(flat)).reshape(B, -1)  # (B*4, 1) -> (B, 4): softmax runs over these
        out = self.head(self.features(b))
        return out.squeeze(-1) if self.kind == "regression" else out


def loss_fn(kind, outputs, labels):
    """Cross-entropy for classification and over the 4 choices of SWAG; mean squared error for regression."""
    if kind == "regression":
        return F.mse_loss(outputs.float(), labels.float())
    return F.cross_entropy(outputs.float(), labels)


def predictions_of(kind, outputs):
    return outputs.float() if kind == "regression" else outputs.argmax(-1)


# ---------------------------------------------------------------------------------------------------- optimisation

def layer_depth(name, num_layers, xlayers=0):
    """ELECTRA's depth of a parameter (App. C.2 "decay 0.9", read as Clark et al. 2020's layer-wise decay):
    embeddings 0, layer i of an encoder i + 1, cross-modal layer j L + 1 + j, the rest (head, poolers, final LN)
    L + xlayers + 2. Names are the Finetuner's (backbone.blocks.3.ffn..., backbone.language.blocks.3..., ...)."""
    parts = name.split(".")
    if parts[0] != "backbone":
        return num_layers + xlayers + 2
    parts = parts[2:] if parts[1] in ("language", "clip") else parts[1:]
    if parts[0] in ("embeddings", "token_embedding", "positional_embedding"):
        return 0
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    if parts[0] == "xlayers":
        return num_layers + 1 + int(parts[1])
    return num_layers + xlayers + 2


def param_groups(net: "Finetuner", lr, layer_decay=None):
    """AdamW groups: one group at lr (the plain recipe), or one per depth at lr * decay ** (top - depth)."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if layer_decay is None:
        return [{"params": [p for _, p in params], "lr": lr}]
    bb = net.backbone
    if isinstance(bb, model.CrossModalTransformer):
        L, X = bb.language.config.num_layers, len(bb.xlayers)
    else:
        L, X = bb.config.num_layers, 0
    top, groups = L + X + 2, {}
    for name, p in params:
        groups.setdefault(layer_depth(name, L, X), []).append(p)
    return [{"params": ps, "lr": lr * layer_decay ** (top - d)} for d, ps in sorted(groups.items())]


def warmup_linear(total_steps, warmup=0.1):
    """Learning-rate factor: linear warm-up over the first 10% of the optimizer steps, then linear decay to 0
    (as transformers' get_linear_schedule_with_warmup, which the authors' script used)."""
    warm = round(total_steps * warmup)
    return lambda step: step / warm if step < warm else max(0.0, (total_steps - step) / max(1, total_steps - warm))


def trimmed(batch, device):
    """Drop the padding columns every row of the batch shares (the masks hide them): (.., 128) -> (.., T)."""
    out = {}
    T = int(batch["attention_mask"].sum(-1).max()) if "attention_mask" in batch else None
    C = int(batch["clip_mask"].sum(-1).max()) if "clip_mask" in batch else None
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "token_type_ids"):
            v = v[..., :T]
        elif k in ("clip_ids", "clip_mask"):
            v = v[..., :max(C, 1)]
        out[k] = v.to(device)
    return out


# ---------------------------------------------------------------------------------------------------- one run

def batches(tensors, indices, size):
    """Consecutive slices of `indices` of at most `size`, as dicts of the tensors' rows."""
    for start in range(0, len(indices), size):
        rows = indices[start:start + size]
        yield {k: v[rows] for k, v in tensors.items()}


@torch.no_grad()
def predict(net, tensors, device, batch_size=128):
    """Dev or test predictions: class ids, regression scores or chosen endings, as a numpy vector."""
    net.eval()
    n = len(next(iter(tensors.values())))
    out = [predictions_of(net.kind, net(trimmed(b, device))).cpu()
           for b in batches({k: v for k, v in tensors.items() if k != "labels"}, torch.arange(n), batch_size)]
    return torch.cat(out).numpy()


def train(net, train_set, dev_sets, args, seed, log=None):
    """Finetune `net` (App. C.2 recipe) and score every dev split after each epoch.

    train_set: encoded tensors with "labels"; dev_sets: {suffix: tensors}. Returns (per-epoch records, seconds).
    """
    device = torch.device(args.device)
    net.to(device)
    n = len(train_set["labels"])
    micro = math.ceil(args.batch_size / args.grad_accum)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(param_groups(net, args.lr, args.layer_decay), weight_decay=args.weight_decay,
                                  eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, args.warmup))
    order = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    history, seconds = [], 0.0
    for epoch in range(1, args.epochs + 1):
        net.train()
        start, losses = time.perf_counter(), []
        permutation = torch.randperm(n, generator=order)
        for step in range(steps_per_epoch):
            rows = permutation[step * args.batch_size:(step + 1) * args.batch_size]
            for part in batches(train_set, rows, micro):  # gradient accumulation: 32 = 4 x 8 in the authors' runs
                b = trimmed(part, device)
                with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                    loss = loss_fn(net.kind, net(b), b["labels"])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch}: try a lower --lr")
                (loss * len(part["labels"]) / len(rows)).backward()
                losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "metrics": {}, "predictions": {}}
        for suffix, tensors in dev_sets.items():
            p = predict(net, tensors, device)
            record["predictions"][suffix] = p
            for k, v in score(args.task, tensors["labels"].numpy(), p).items():
                record["metrics"][k + suffix] = v
        history.append(record)
        if log:
            log(f"  epoch {epoch}: loss {record['train_loss']:.4f}, " + format_metrics(record["metrics"]))
    return history, seconds


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" if k.startswith("rmse") else f"{k} {100 * v:.2f}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------------- data and models

def splits(task, kind):
    """{metric suffix: data.read_task split}: MNLI scores matched and mismatched dev sets (and test sets)."""
    if task == "mnli":
        return {"_m": f"{kind}_matched", "_mm": f"{kind}_mismatched"} | ({"_ax": "test_ax"} if kind == "test" else {})
    return {"": kind}


def load_backbone(args):
    """(backbone, variant, BERT tokenizer or None, CLIP tokenizer or None) for --encoder / --full-model."""
    if args.full_model:
        run = args.encoder.rstrip("/")
        candidates = (os.path.join(run, "crossmodal.pt"), os.path.join(os.path.dirname(run), "crossmodal.pt"))
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise SystemExit(f"--full-model needs crossmodal.pt in {run} or next to it: give --encoder "
                             f"runs/<run>/xdbert of a run of `python adapt.py`")
        xm = model.load_crossmodal(path)
        if xm.clip is None:
            raise SystemExit(f"{path} is the MLM-only baseline (no CLIP-T): finetune its xdbert/ without --full-model")
        bert_tok = data.bert_tokenizer(os.path.join(os.path.dirname(path), "xdbert"))
        return xm, "full-model", bert_tok, data.clip_tokenizer(data.checkpoint_dir(args.clip, args.data))
    path = data.checkpoint_dir(args.encoder, args.data)
    backbone = model.from_hf(path)
    if isinstance(backbone, model.CLIPTextTransformer):
        return backbone, "clip", None, data.clip_tokenizer(path)
    return backbone, "encoder", data.bert_tokenizer(path), None


def model_size(backbone):
    """Table 5 columns: 'large' for 1024-wide encoders, else 'base' (CLIP-T counts as base)."""
    cfg = backbone.language.config if isinstance(backbone, model.CrossModalTransformer) else backbone.config
    return "large" if getattr(cfg, "hidden_size", 0) >= 1024 else "base"


def default_lr(task, size):
    """Table 5: RTE, MRPC and STS-B train at the higher rate."""
    return LEARNING_RATES[size]["small" if task in SMALL_TASKS else "other"]


def model_label(args, variant):
    """Table row name: the checkpoint name, or the adapt.py run's name for runs/<run>/xdbert; X- for the full model,
    -ld<decay> for layer-wise decay (so that the two readings of App. C.2 get their own runs and rows)."""
    if args.name:
        return args.name
    path = os.path.normpath(args.encoder)
    base = os.path.basename(path)
    if base == "xdbert":
        base = os.path.basename(os.path.dirname(path))
    base = "X-" + base if variant == "full-model" else base
    return base + (f"-ld{args.layer_decay:g}" if args.layer_decay is not None else "")


# ---------------------------------------------------------------------------------------------------- outputs

def python_value(x):
    return float(x) if isinstance(x, (float, np.floating)) else int(x)


def dev_prediction_lines(examples, labels, predictions):
    """One JSON object per dev example, in dev-file order (pwcca.py's visual-grounding analysis reads these)."""
    return "".join(json.dumps({"index": i, "text_a": ex.text_a, "text_b": ex.text_b, "label": python_value(y),
                               "prediction": python_value(p)}) + "\n"
                   for i, (ex, y, p) in enumerate(zip(examples, labels, predictions)))


def submission_tsv(task, ids, predictions, label_names):
    """GLUE submission file (sources.md 1): header index<TAB>prediction, one row per test line in file order with
    the file's own index (or id); label strings for MNLI, QNLI and RTE, 0/1 for the other classification tasks,
    a float for STS-B."""
    rows = ["index\tprediction"]
    for i, p in zip(ids, predictions):
        if task == "stsb":
            value = f"{float(p):.6f}"
        elif task in STRING_LABEL_TASKS:
            value = label_names[int(p)]
        else:
            value = str(int(p))
        rows.append(f"{i}\t{value}")
    return "\n".join(rows) + "\n"


def glue_test_path(task, split, data_root):
    """The GLUE test file of a split, or None when the task has no GLUE test set or it is not downloaded."""
    spec = data.TASKS[task]
    if task not in SUBMISSION_NAMES or not spec.glue_dir:
        return None
    path = os.path.join(data_root, spec.folder, spec.splits[split])
    return path if os.path.isfile(path) else None


def submission_file(task, suffix):
    """The file name GLUE's server expects: RTE.tsv, MNLI-m.tsv, MNLI-mm.tsv, and AX.tsv from the MNLI model."""
    if suffix == "_ax":
        return "AX.tsv"
    return SUBMISSION_NAMES[task] + {"": "", "_m": "-m", "_mm": "-mm"}[suffix] + ".tsv"


# ---------------------------------------------------------------------------------------------------- seeds

def run_seeds(args, log=print):
    """Load and encode once, then finetune one fresh copy per seed; print each run and the medians.
    Returns the list of results dicts (also written to runs/<task>-<model>-seed<k>/results.json)."""
    task = data.TASKS[args.task]
    try:
        backbone, variant, bert_tok, clip_tok = load_backbone(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    size = model_size(backbone)
    lr = args.lr if args.lr is not None else TOY_LR if args.toy else default_lr(args.task, size)
    label = model_label(args, variant)

    def encode(split):
        examples = data.read_task(args.task, split, args.data)
        return examples, data.encode(examples, args.task, bert_tok, args.max_len, clip_tok)

    try:  # missing files and bad labels: data.py's errors name the file (and line) and the command to run
        _, train_set = encode("train")
        dev = {suffix: encode(split) for suffix, split in splits(args.task, "dev").items()}
        test = {suffix: encode(split) for suffix, split in splits(args.task, "test").items()
                if glue_test_path(args.task, split, args.data)}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    sentences = train_set["clip_ids"].shape[-2] // 2 if variant == "clip" else 1
    hparams = {"lr": lr, "layer_decay": args.layer_decay, "warmup": args.warmup, "epochs": args.epochs,
               "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_len": args.max_len,
               "weight_decay": args.weight_decay, "dropout": args.dropout, "model_size": size}
    run_args = argparse.Namespace(**{**vars(args), "lr": lr})
    n_train = len(train_set["labels"])
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        torch.manual_seed(seed)  # head initialisation and dropout
        net = Finetuner(copy.deepcopy(backbone), task.kind, task.num_labels, args.dropout, sentences)
        history, seconds = train(net, train_set, {s: t for s, (_, t) in dev.items()}, run_args, seed,
                                 log if args.verbose else None)
        run_dir = os.path.join(args.out, f"{args.task}-{label}-seed{seed}")
        final = history[-1]
        for suffix, (examples, tensors) in dev.items():
            name = "dev_mismatched_predictions.jsonl" if suffix == "_mm" else "dev_predictions.jsonl"
            with model.atomic_file(os.path.join(run_dir, name), "w") as out:
                out.write(dev_prediction_lines(examples, tensors["labels"].numpy(), final["predictions"][suffix]))
        submissions = []
        for suffix, (examples, tensors) in test.items():
            path = os.path.join(run_dir, "glue_test", submission_file(args.task, suffix))
            with model.atomic_file(path, "w") as out:
                out.write(submission_tsv(args.task, [ex.guid for ex in examples],
                                         predict(net, tensors, torch.device(args.device)), task.label_names))
            submissions.append(path)
        result = {"task": args.task, "model": label, "variant": variant, "encoder": args.encoder, "seed": seed,
                  "metrics": final["metrics"], "main_metric": task.metrics[0] + next(iter(dev)),
                  "epochs": [{"epoch": h["epoch"], "train_loss": h["train_loss"], "metrics": h["metrics"]}
                             for h in history],
                  "hparams": hparams, "train_examples": n_train, "train_seconds": round(seconds, 3),
                  "train_examples_per_second": round(n_train * args.epochs / seconds, 1),
                  "dev_predictions": os.path.join(run_dir, "dev_predictions.jsonl"), "test_predictions": submissions}
        with model.atomic_file(os.path.join(run_dir, "results.json"), "w") as out:
            out.write(json.dumps(result, indent=2) + "\n")
        results.append(result)
        log(f"{args.task} {label} seed {seed}: {format_metrics(final['metrics'])} "
            f"({seconds:.1f} s, {result['train_examples_per_second']:.0f} train examples/s) -> {run_dir}")
    middle = median_run(results)
    log(f"{args.task} {label} median of {len(results)} seed(s) by {middle['main_metric']}: "
        f"{format_metrics(middle['metrics'])} (seed {middle['seed']})")
    return results


# ---------------------------------------------------------------------------------------------------- Table 1

def table(paths) -> str:
    """A Markdown table like the paper's Table 1 from results.json files: a row per model, a column per task,
    each cell the metrics of the median run (median_run; x100, RMSE as is) with the number of seeds; two metrics
    as a/b."""
    cells = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read results file {path} ({e}): give results.json files written by finetune.py")
        cells.setdefault(r["model"], {}).setdefault(r["task"], []).append(r)
    tasks = [t for t in TASK_ORDER if any(t in row for row in cells.values())]
    lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, row in cells.items():
        out = []
        for t in tasks:
            if t not in row:
                out.append("")
                continue
            m = median_run(row[t])["metrics"]
            values = "/".join(f"{v:.3f}" if k.startswith("rmse") else f"{100 * v:.2f}" for k, v in m.items())
            out.append(f"{values} ({len(row[t])})")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- benchmark

def bench(presets, batch_size, seq_len, steps, device):
    """Finetuning examples/s (forward + backward + AdamW step, then eval forward) of a classifier on random
    weights from model.PRESETS and random full-length inputs (batch_size, seq_len): no download needed."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, float32, batch {batch_size} "
          f"x {seq_len} tokens, median of {steps} steps after 1 warm-up")
    for preset in presets:
        cfg = model.PRESETS[preset]
        torch.manual_seed(0)
        net = Finetuner(model.LanguageEncoder(cfg), "classification", 2).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
        b = {"input_ids": torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
             "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (batch_size,), device=device)}
        times = {"train": [], "eval": []}
        for i in range(steps + 1):
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            net.train()
            t = time.perf_counter()
            loss_fn("classification", net(b), b["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t_train = time.perf_counter() - t
            net.eval()
            t = time.perf_counter()
            with torch.no_grad():
                net(b)
            sync()
            if i:
                times["train"].append(t_train)
                times["eval"].append(time.perf_counter() - t)
        train_s, eval_s = statistics.median(times["train"]), statistics.median(times["eval"])
        print(f"{preset:10s} train {batch_size / train_s:8.1f} examples/s ({train_s * 1e3:.0f} ms/step), "
              f"eval {batch_size / eval_s:8.1f} examples/s")


# ---------------------------------------------------------------------------------------------------- CLI

def task_parser():
    p = argparse.ArgumentParser(prog="finetune.py", description="Finetune an encoder on a GLUE / SWAG / READ task "
                                "(App. C.2). Other commands: `table FILES...`, `bench`.")
    p.add_argument("task", help="one of " + ", ".join(TASK_ORDER))
    p.add_argument("--data", default="data", help="data root (default: data)")
    p.add_argument("--toy", action="store_true", help="--data data/toy --encoder bert-toy --clip clip-toy, 3 seeds, "
                   f"lr {TOY_LR} (the toy encoders have random weights)")
    p.add_argument("--encoder", help="a name under DATA/ckpt (bert-base, bert-large, electra-base, electra-large, "
                   "clip) or a hub-layout dir such as runs/<run>/xdbert (default: bert-base)")
    p.add_argument("--full-model", action="store_true", help="App. C.3: finetune the whole cross-modal model of the "
                   "adapt.py run of --encoder (its crossmodal.pt)")
    p.add_argument("--clip", help="CLIP checkpoint whose tokenizer feeds --full-model (default: clip)")
    p.add_argument("--lr", type=float, help="learning rate (default: Table 5 by task and model size)")
    p.add_argument("--layer-decay", type=float, help="ELECTRA-style layer-wise decay, e.g. 0.9 (default: none, "
                   "the plain linear schedule of the authors' BERT script)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (the authors: 4 x 8)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up share of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.1, help="dropout before the head")
    p.add_argument("--seeds", type=int, help="number of seeds (default: 9 for RTE, 5 otherwise, 3 with --toy)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--out", default="runs", help="runs root: each seed writes OUT/<task>-<model>-seed<k>/")
    p.add_argument("--name", help="model name in the results and the table (default: from --encoder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--verbose", action="store_true", help="print every epoch's dev scores")
    return p


def parse_task_args(argv):
    args = task_parser().parse_args(argv)
    if args.task not in data.TASKS:
        raise SystemExit(f"unknown task {args.task!r}: choose one of {', '.join(TASK_ORDER)}")
    if args.toy:
        args.data = "data/toy" if args.data == "data" else args.data
        args.encoder = args.encoder or "bert-toy"
        args.clip = args.clip or "clip-toy"
    args.encoder, args.clip = args.encoder or "bert-base", args.clip or "clip"
    if args.seeds is None:
        args.seeds = TOY_SEEDS if args.toy else DEFAULT_SEEDS.get(args.task, 5)
    for name in ("epochs", "batch_size", "grad_accum", "seeds", "max_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.grad_accum > args.batch_size:
        raise SystemExit("--grad-accum cannot exceed --batch-size: each micro-batch needs an example")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        if len(argv) < 2:
            raise SystemExit("usage: python finetune.py table runs/*/results.json")
        print(table(argv[1:]))
    elif argv[:1] == ["bench"]:
        p = argparse.ArgumentParser(prog="finetune.py bench")
        p.add_argument("--presets", nargs="+", default=["bert-toy", "bert-base"],
                       choices=[k for k, v in model.PRESETS.items() if isinstance(v, model.EncoderConfig)])
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--max-len", type=int, default=128)
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        a = p.parse_args(argv[1:])
        bench(a.presets, a.batch_size, a.max_len, a.steps, a.device)
    else:
        run_seeds(parse_task_args(argv))


if __name__ == "__main__":
    main()
