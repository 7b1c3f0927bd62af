"""Finetuning XDBERT and its baselines on GLUE, SWAG and READ (Sec. 2.4, 3, App. C.2, C.3).

    python finetune.py rte --encoder bert-base              # or a path to an adapted runs/<run>/xdbert
    python finetune.py rte --toy                            # the toy kit: seconds on 2 CPU cores
    python finetune.py rte --encoder runs/<run>/xdbert --full-model   # App. C.3: the whole cross-modal model
    python finetune.py sst2 --encoder clip                  # Table 1's CLIP-T row
    python finetune.py sweep --encoders bert-base,runs/<run>/xdbert   # Table 1: every task x encoder x seed
    python finetune.py table runs/*/results.json            # a table like the paper's Table 1
    python finetune.py bench                                # finetuning examples/s, random weights

Recipe (App. C.2, Table 5): AdamW, learning rate 1e-4 for RTE, MRPC and STS-B and 2e-5 for the other tasks on
base-sized encoders (5e-5 and 1e-5 on large ones), 10% linear warm-up then linear decay to 0, 3 epochs, maximum
length 128, batch 32 (the authors ran 4 x 8 accumulation: `--grad-accum`), weight decay 0, dropout 0.1, gradient
clipping 1.0 (the Hugging Face Trainer default the authors' script ran with). The median of 5 seeds, 9 for RTE, is
the run whose main metric (the task's first) is the median, so all metrics of a row come from one seed.
"Learning rate decay of 0.9" reads like ELECTRA's layer-wise decay (`--layer-decay 0.9`, `_get_layer_lrs` in
google-research/electra); the default is the plain schedule of the authors' BERT script.

Heads (Sec. 2.4; here, not in model.py, since finetuning alone uses them): BERT's pooled [CLS] -> dropout ->
linear; ELECTRA, without a pooler, [CLS] -> dropout -> dense -> GELU -> dropout -> linear (Hugging Face's
ElectraClassificationHead); one output and mean squared error for regression; SWAG scores each (context, ending)
pair and takes the softmax over an example's 4 scores; CLIP-T alone averages the pooled end-of-text outputs of each
sentence's non-empty blocks (2 per sentence, App. B); the full model (App. C.3) uses the cross-modal [CLS] pooler.

A seed writes OUT/<task>-<model>-seed<k>/: results.json, dev_predictions.jsonl (MNLI also
dev_mismatched_predictions.jsonl) and, when the GLUE test file is there, glue_test/<Task>.tsv in the submission
format. <model> is the encoder's name followed by every setting that differs from the recipe (-lr3e-05, -ep1, ...),
so runs with other settings never overwrite each other. On CUDA, bf16 autocast with TF32 matmuls and fused AdamW
(`--dtype fp32` for plain fp32); on the CPU, fp32. Metrics are written with numpy; constant sides give Pearson and
Spearman 0.0, a degenerate marginal MCC 0.0, no positive at all F1 0.0 (scikit-learn's zero_division=0).
"""
import argparse
import collections
import copy
import csv
import ctypes
import datetime
import functools
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model

TASK_ORDER = tuple(data.TASKS)  # Table 1's column order: the 9 GLUE tasks, SWAG, READ
TABLE1_GLUE = ("rte", "mrpc", "stsb", "cola", "sst2", "qnli", "qqp", "mnli")  # the GLUE tasks Table 1 averages
SMALL_TASKS = ("rte", "mrpc", "stsb")  # Table 5: the higher learning rate
LEARNING_RATES = {"base": {"small": 1e-4, "other": 2e-5}, "large": {"small": 5e-5, "other": 1e-5}}  # Table 5
DEFAULT_SEEDS = {"rte": 9}  # App. C.2: median of 9 runs for RTE, 5 for the others
TOY_SEEDS = 3
TOY_LR = 3e-3  # --toy: the toy encoders have random weights (download.py --toy), Table 5's rates barely move them
# App. C.2's settings; lr None means Table 5's rate. A run's name lists those that differ, with these short names.
RECIPE = {"lr": None, "layer_decay": None, "warmup": 0.1, "epochs": 3, "batch_size": 32, "max_len": 128,
          "weight_decay": 0.0, "dropout": 0.1, "max_train_examples": None}
SHORT = {"lr": "lr", "layer_decay": "ld", "warmup": "wu", "epochs": "ep", "batch_size": "bs", "max_len": "len",
         "weight_decay": "wd", "dropout": "drop", "max_train_examples": "n"}
GRAD_CLIP = 1.0
CHECK_EVERY = 50  # optimizer steps between two looks at the loss on the host (each look waits for the device)


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


def use_bf16(device, dtype=None) -> bool:
    """Precision: bf16 autocast by default on CUDA, fp32 on the CPU (whose results stay those of plain fp32);
    `--dtype` chooses either explicitly."""
    return (dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")) == "bf16"


def autocast(device, bf16):
    """The precision of a step: bf16 autocast when asked; on CUDA the matmuls left in fp32 use TF32 with bf16 and
    full fp32 without (--dtype fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bf16
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)


def adamw(groups, device, weight_decay=0.0):
    """App. C.2's AdamW, fused into one kernel on CUDA."""
    return torch.optim.AdamW(groups, weight_decay=weight_decay, eps=1e-8,
                             fused=True if torch.device(device).type == "cuda" else None)


def trimmed(batch, device):
    """Drop the padding columns every row of the batch shares (the masks hide them): (.., 128) -> (.., T); decided
    on the CPU batch, copied to a GPU from pinned memory without waiting."""
    out, device = {}, torch.device(device)
    T = int(batch["attention_mask"].sum(-1).max()) if "attention_mask" in batch else None
    C = int(batch["clip_mask"].sum(-1).max()) if "clip_mask" in batch else None
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "token_type_ids"):
            v = v[..., :T]
        elif k in ("clip_ids", "clip_mask"):
            v = v[..., :max(C, 1)]
        out[k] = v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v
    return out


# ---------------------------------------------------------------------------------------------------- one run

def batches(tensors, indices, size):
    """Consecutive slices of `indices` of at most `size`, as dicts of the tensors' rows."""
    for start in range(0, len(indices), size):
        rows = indices[start:start + size]
        yield {k: v[rows] for k, v in tensors.items()}


@torch.no_grad()
def predict(net, tensors, device, bf16=False, batch_size=128):
    """Dev or test predictions: class ids, regression scores or chosen endings, as a numpy vector."""
    net.eval()
    n = len(next(iter(tensors.values())))
    with autocast(device, bf16):
        out = [predictions_of(net.kind, net(trimmed(b, device)))
               for b in batches({k: v for k, v in tensors.items() if k != "labels"}, torch.arange(n), batch_size)]
    return torch.cat(out).cpu().numpy()


def check_finite(losses, first_step):
    """Raise FloatingPointError naming the first optimizer step (counted from 1) of `losses` whose loss is NaN or
    inf. One host sync for the whole window of steps."""
    bad = torch.nonzero(~torch.isfinite(torch.stack(losses)))
    if len(bad):
        step = first_step + int(bad[0])
        raise FloatingPointError(f"the training loss became {float(losses[int(bad[0])])} at step {step}: "
                                 f"finetune again with a lower --lr")


def train(net, train_set, dev_sets, args, seed, log=None):
    """Finetune `net` (App. C.2 recipe) and score every dev split after each epoch. The loss stays on the device
    and is checked every CHECK_EVERY steps and at each epoch's end.

    train_set: encoded tensors with "labels"; dev_sets: {suffix: tensors}. Returns (per-epoch records, seconds).
    """
    device = torch.device(args.device)
    bf16 = use_bf16(device, args.dtype)
    net.to(device)
    n = len(train_set["labels"])
    micro = math.ceil(args.batch_size / args.grad_accum)
    steps_per_epoch = math.ceil(n / args.batch_size)
    optimizer = adamw(param_groups(net, args.lr, args.layer_decay), device, args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(steps_per_epoch * args.epochs,
                                                                          args.warmup))
    order = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    history, seconds = [], 0.0
    for epoch in range(1, args.epochs + 1):
        net.train()
        start, losses, checked = time.perf_counter(), [], 0  # losses: one 0-d device tensor per step
        permutation = torch.randperm(n, generator=order)
        for step in range(steps_per_epoch):
            rows = permutation[step * args.batch_size:(step + 1) * args.batch_size]
            step_loss = 0.0
            for part in batches(train_set, rows, micro):  # gradient accumulation: 32 = 4 x 8 in the authors' runs
                b = trimmed(part, device)
                with autocast(device, bf16):
                    loss = loss_fn(net.kind, net(b), b["labels"]) * (len(part["labels"]) / len(rows))
                loss.backward()
                step_loss = step_loss + loss.detach()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if len(losses) - checked == CHECK_EVERY or step == steps_per_epoch - 1:
                check_finite(losses[checked:], (epoch - 1) * steps_per_epoch + checked + 1)
                checked = len(losses)
        seconds += time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": float(torch.stack(losses).double().mean()), "metrics": {},
                  "predictions": {}}
        for suffix, tensors in dev_sets.items():
            p = predict(net, tensors, device, bf16)
            record["predictions"][suffix] = p
            record["metrics"] |= {k + suffix: v for k, v in score(args.task, tensors["labels"].numpy(), p).items()}
        history.append(record)
        if log:
            log(f"  epoch {epoch}: loss {record['train_loss']:.4f}, " + format_metrics(record["metrics"]))
    return history, seconds


def shown(metric, value):
    """A metric as Table 1 prints it: x100 with 2 decimals, RMSE in target units with 4."""
    return f"{value:.4f}" if metric.startswith("rmse") else f"{100 * value:.2f}"


def format_metrics(metrics):
    return ", ".join(f"{k} {shown(k, v)}" for k, v in metrics.items())


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
            raise FileNotFoundError(f"--full-model needs crossmodal.pt in {run} or next to it: give --encoder "
                                    f"runs/<run>/xdbert of a run of `python adapt.py`")
        xm = model.load_crossmodal(path)
        if xm.clip is None:
            raise ValueError(f"{path} is the MLM-only baseline (no CLIP-T): finetune its xdbert/ without --full-model")
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


def plan(args, variant, size) -> dict:
    """What every seed of this command records, the seed aside: task, model (the table's row name), variant,
    encoder and the settings. The model name is --name or the checkpoint's (the adapt.py run's for
    runs/<run>/xdbert; X- for the full model) followed by each setting that differs from the recipe (App. C.2,
    Table 5; TOY_LR with --toy), e.g. rte-bert-base-lr3e-05-ep1, so a run never overwrites one with other settings."""
    recipe = RECIPE | {"lr": TOY_LR if args.toy else default_lr(args.task, size)}
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in recipe.items()}
    name = args.name
    if not name:
        path = os.path.normpath(args.encoder)
        name = os.path.basename(path)
        name = os.path.basename(os.path.dirname(path)) if name == "xdbert" else name
        name = "X-" + name if variant == "full-model" else name
    name += "".join(f"-{SHORT[k]}{v:g}" for k, v in settings.items() if v != recipe[k])
    return {"task": args.task, "model": name, "variant": variant, "encoder": args.encoder,
            "hparams": settings | {"grad_accum": args.grad_accum, "model_size": size,
                                   "dtype": "bf16" if use_bf16(args.device, args.dtype) else "fp32"}}


def same_settings(a, b) -> bool:
    """Two results of one experiment: task, model, variant, encoder, seed and recipe settings agree (precision,
    accumulation and speed may differ)."""
    return (all(a.get(k) == b.get(k) for k in ("task", "model", "variant", "encoder", "seed"))
            and all(a.get("hparams", {}).get(k) == b["hparams"].get(k) for k in RECIPE))


# ---------------------------------------------------------------------------------------------------- outputs

def dev_prediction_lines(examples, labels, predictions):
    """One JSON object per dev example, in dev-file order (pwcca.py's visual-grounding analysis reads these)."""
    return "".join(json.dumps({"index": i, "text_a": ex.text_a, "text_b": ex.text_b, "label": y.item(),
                               "prediction": p.item()}) + "\n"
                   for i, (ex, y, p) in enumerate(zip(examples, labels, predictions)))


def submission_tsv(task, ids, predictions, label_names):
    """A GLUE submission file: header index<TAB>prediction, one row per test line in file order with the file's own
    index (or id); a float for STS-B, else the label as the task's files write it (entailment / not_entailment for
    RTE and QNLI, MNLI's three names, 0/1 for the others)."""
    values = (f"{float(p):.6f}" if task == "stsb" else label_names[int(p)] for p in predictions)
    return "".join(f"{i}\t{v}\n" for i, v in zip(["index", *ids], ["prediction", *values]))


def glue_test_path(task, split, data_root):
    """The GLUE test file of a split, or None when the task has no GLUE test set or it is not downloaded."""
    spec = data.TASKS[task]
    path = os.path.join(data_root, spec.folder, spec.splits[split]) if spec.glue_dir else ""
    return path if os.path.isfile(path) else None


def submission_file(task, suffix):
    """The file name GLUE's server expects: RTE.tsv, MNLI-m.tsv, MNLI-mm.tsv, and AX.tsv from the MNLI model."""
    return "AX.tsv" if suffix == "_ax" else f"{data.TASKS[task].glue_dir}{suffix.replace('_', '-')}.tsv"


def write_run(run_dir, result, net, dev, test, final, args):
    """A finished seed's files: dev predictions, GLUE test predictions, then results.json (last: its presence
    means the run is complete)."""
    for suffix, (examples, tensors) in dev.items():
        name = "dev_mismatched_predictions.jsonl" if suffix == "_mm" else "dev_predictions.jsonl"
        with model.atomic_file(os.path.join(run_dir, name), "w") as out:
            out.write(dev_prediction_lines(examples, tensors["labels"].numpy(), final["predictions"][suffix]))
    result["test_predictions"] = []
    for suffix, (examples, tensors) in test.items():
        path = os.path.join(run_dir, "glue_test", submission_file(args.task, suffix))
        predictions = predict(net, tensors, args.device, use_bf16(args.device, args.dtype))
        with model.atomic_file(path, "w") as out:
            out.write(submission_tsv(args.task, [ex.guid for ex in examples], predictions,
                                     data.TASKS[args.task].label_names))
        result["test_predictions"].append(path)
    with model.atomic_file(os.path.join(run_dir, "results.json"), "w") as out:
        out.write(json.dumps(result, indent=2) + "\n")


def run_seeds(args, log=print):
    """Load and encode once, then finetune one fresh copy per seed; print each run and the median run.
    Returns the list of results dicts (also written to OUT/<task>-<model>-seed<k>/results.json)."""
    task = data.TASKS[args.task]
    backbone, variant, bert_tok, clip_tok = load_backbone(args)
    head = plan(args, variant, model_size(backbone))
    runs = {seed: os.path.join(args.out, f"{args.task}-{head['model']}-seed{seed}")
            for seed in range(args.seed, args.seed + args.seeds)}
    for seed, run_dir in runs.items():  # before any training
        old = results_in(run_dir)
        if old is not None and not same_settings(old, head | {"seed": seed}):
            raise ValueError(f"{run_dir} holds a run with other settings (encoder {old.get('encoder')}, "
                             f"{old.get('hparams')}): give another --name or --out, or delete it")
    run_args = argparse.Namespace(**(vars(args) | head["hparams"]))

    def encode(split, limit=None):
        examples = data.read_task(args.task, split, args.data)[:limit]
        return examples, data.encode(examples, args.task, bert_tok, run_args.max_len, clip_tok)

    _, train_set = encode("train", run_args.max_train_examples)
    dev = {suffix: encode(split) for suffix, split in splits(args.task, "dev").items()}
    test = {suffix: encode(split) for suffix, split in splits(args.task, "test").items()
            if glue_test_path(args.task, split, args.data)}
    sentences = train_set["clip_ids"].shape[-2] // 2 if variant == "clip" else 1
    n_train, results = len(train_set["labels"]), []
    for seed, run_dir in runs.items():
        torch.manual_seed(seed)  # head initialisation and dropout
        net = Finetuner(copy.deepcopy(backbone), task.kind, task.num_labels, run_args.dropout, sentences)
        history, seconds = train(net, train_set, {s: t for s, (_, t) in dev.items()}, run_args, seed,
                                 log if args.verbose else None)
        final = history[-1]
        result = head | {"seed": seed, "metrics": final["metrics"], "main_metric": task.metrics[0] + next(iter(dev)),
                         "epochs": [{"epoch": h["epoch"], "train_loss": h["train_loss"], "metrics": h["metrics"]}
                                    for h in history],
                         "train_examples": n_train, "train_seconds": round(seconds, 3),
                         "train_examples_per_second": round(n_train * run_args.epochs / seconds, 1),
                         "dev_predictions": os.path.join(run_dir, "dev_predictions.jsonl")}
        write_run(run_dir, result, net, dev, test, final, run_args)
        results.append(result)
        log(f"{args.task} {head['model']} seed {seed}: {format_metrics(final['metrics'])} "
            f"({seconds:.1f} s, {result['train_examples_per_second']:.0f} train examples/s) -> {run_dir}")
    middle = median_run(results)
    log(f"{args.task} {head['model']} median of {len(results)} seed(s) by {middle['main_metric']}: "
        f"{format_metrics(middle['metrics'])} (seed {middle['seed']})")
    return results


# ---------------------------------------------------------------------------------------------------- Table 1

def read_results(path) -> dict:
    """A results.json written by finetune.py, checked (run_dir added): a ValueError names a file that is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as a results file ({e}): give results.json files of finetune.py")
    if not isinstance(r, dict) or not {"task", "model", "seed", "metrics", "main_metric"} <= set(r):
        raise ValueError(f"{path} is not a results file of finetune.py (task, model, seed, metrics, main_metric): "
                         f"give the results.json of finetuning runs")
    if r["task"] not in data.TASKS or not isinstance(r["metrics"], dict) or r["main_metric"] not in r["metrics"]:
        raise ValueError(f"{path} has no {r['main_metric']} among its metrics: its run did not finish, run it again")
    return r | {"run_dir": os.path.dirname(os.path.abspath(path))}


def results_in(run_dir):
    """The results of the finished run in run_dir (results.json and the files it lists), else None."""
    try:
        r = read_results(os.path.join(run_dir, "results.json"))
    except ValueError:
        return None
    files = [os.path.join(run_dir, "glue_test", os.path.basename(p)) for p in r.get("test_predictions", [])]
    return r if all(map(os.path.isfile, [*files, os.path.join(run_dir, "dev_predictions.jsonl")])) else None


def table(results) -> tuple[str, str]:
    """Table 1 from results dicts, as (Markdown, CSV): a row per model, a column per task, each cell the median run's
    metrics (shown; two metrics as a/b), the range of the main metric over the seeds and the seed count.
    The GLUE column, for models with all of Table 1's GLUE tasks, scores as the GLUE benchmark does: the mean of a
    task's metrics, then the mean over the tasks (MNLI matched and mismatched count as its two)."""
    cells = {}
    for r in results:
        cells.setdefault(r["model"], {}).setdefault(r["task"], []).append(r)
    tasks = [t for t in TASK_ORDER if any(t in row for row in cells.values())]
    glue = [t for t in tasks if data.TASKS[t].glue_dir]  # TASK_ORDER puts them first
    columns = glue + ["GLUE"] * any(set(TABLE1_GLUE) <= set(row) for row in cells.values()) + tasks[len(glue):]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = [("model", "task", "seeds", "median_seed", "metric", "value", "min", "max")]
    for name, row in cells.items():
        out = {}
        for t, runs in row.items():
            mid, main = median_run(runs), runs[0]["main_metric"]
            lo, hi = (f(r["metrics"][main] for r in runs) for f in (min, max))
            spread = f" [{shown(main, lo)}, {shown(main, hi)}]" if len(runs) > 1 else ""
            out[t] = "/".join(shown(k, v) for k, v in mid["metrics"].items()) + f"{spread} ({len(runs)})"
            rows += [(name, t, len(runs), mid["seed"], k, v, min(r["metrics"][k] for r in runs),
                      max(r["metrics"][k] for r in runs)) for k, v in mid["metrics"].items()]
        if set(TABLE1_GLUE) <= set(row):
            average = statistics.mean(statistics.mean(median_run(row[t])["metrics"].values()) for t in TABLE1_GLUE)
            out["GLUE"] = f"{100 * average:.2f}"
            rows.append((name, "GLUE", "", "", "average", average, "", ""))
        lines.append(f"| {name} | " + " | ".join(out.get(c, "") for c in columns) + " |")
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return "\n".join(lines), text.getvalue()


def glue_submission(results, path):
    """A GLUE submission zip of the median run of each GLUE task (its glue_test/*.tsv); returns the file names."""
    names = []
    with model.atomic_file(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for task in TASK_ORDER:
            runs = [r for r in results if r["task"] == task]
            if not runs or not data.TASKS[task].glue_dir:
                continue
            middle = median_run(runs)
            for tsv in middle.get("test_predictions", []):
                names.append(os.path.basename(tsv))
                z.write(os.path.join(middle["run_dir"], "glue_test", names[-1]), names[-1])
    return names


# ---------------------------------------------------------------------------------------------------- sweep

Job = collections.namedtuple("Job", "name argv run_dir expected cost")


def sweep_jobs(encoders, tasks, seeds, extra) -> list[Job]:
    """Every (task, encoder, seed) of a sweep, in a stable order, as the `finetune.py TASK` command that runs it, its
    run dir, what its results must record and its cost (train file bytes x epochs x encoder parameters).
    seeds: a number per task, or None for the paper's (App. C.2: 9 for RTE, 5 otherwise)."""
    jobs, encoder_facts = [], {}
    for task in tasks:
        for encoder in encoders:
            for seed in range(seeds or DEFAULT_SEEDS.get(task, 5)):
                argv = [task, "--encoder", encoder, "--seed", str(seed), "--seeds", "1", *extra]
                args = parse_task_args(argv)
                if encoder not in encoder_facts:
                    backbone, variant, *_ = load_backbone(args)
                    encoder_facts[encoder] = variant, model_size(backbone), model.count_parameters(backbone)
                variant, size, params = encoder_facts[encoder]
                expected = plan(args, variant, size) | {"seed": seed}
                name = f"{task}-{expected['model']}-seed{seed}"
                spec = data.TASKS[task]
                train_file = os.path.join(args.data, spec.folder, spec.splits["train"])
                size_bytes = os.path.getsize(train_file) if os.path.isfile(train_file) else 1
                jobs.append(Job(name, argv, os.path.join(args.out, name), expected, size_bytes * args.epochs * params))
    return jobs


def shard(jobs, i, n) -> list[Job]:
    """--shard I/N: every N-th job of the largest-first list, from the I-th; the N shares are disjoint, cover the
    list and get a fair part of the big jobs each. The share keeps the largest-first order."""
    return sorted(jobs, key=lambda j: -j.cost)[i - 1::n]


def finished(job):
    """The job's results when its run is complete and was made with the job's settings, else None."""
    r = results_in(job.run_dir)
    return r if r is not None and same_settings(r, job.expected) else None


def visible_gpus() -> list[str]:
    """The GPUs a worker can be given: CUDA_VISIBLE_DEVICES's entries, else 0 .. count-1; none without CUDA."""
    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env.split(",") if env else [str(i) for i in range(torch.cuda.device_count())]


def _die_with_sweep(sweep_pid, prctl):
    """A worker's preexec_fn: Linux kills the worker when the sweep dies (prctl PR_SET_PDEATHSIG), so a killed sweep
    leaves no job running. Elsewhere an orphaned job finishes, writing its files atomically, and a rerun skips it."""
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != sweep_pid:  # the sweep died before the request took effect
        os._exit(1)


def start_job(job, log_path, gpu, threads):
    """`python finetune.py TASK ...` in a process of its own (seeing one GPU, or `threads` CPU threads), its output
    appended to log_path."""
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    env |= {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    die = functools.partial(_die_with_sweep, os.getpid(), getattr(ctypes.CDLL(None), "prctl", None))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ python finetune.py {' '.join(job.argv)}\n")
        log.flush()
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *job.argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=die)


def tail(path, n):
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(collections.deque(f, n)).rstrip()


def run_sweep(jobs, workers, log=print) -> list[Job]:
    """Run the jobs without finished results of the same settings, in list order, `workers` at a time, each in its
    own process; a failed job is retried once. Prints progress and an ETA; returns the jobs that failed twice."""
    todo = collections.deque(j for j in jobs if not finished(j))
    log(f"sweep: {len(jobs)} jobs, {len(jobs) - len(todo)} finished before, {len(todo)} to run "
        f"on {workers} worker(s)")
    gpus, threads = visible_gpus(), max(1, (os.cpu_count() or 1) // workers)
    logs = lambda job: os.path.join(os.path.dirname(job.run_dir), "sweep-logs", job.name + ".log")
    running, tries, failed, done, total = {}, collections.Counter(), [], [], len(todo)
    while todo or running:
        for slot in [s for s in range(workers) if s not in running][:len(todo)]:
            job = todo.popleft()
            tries[job.name] += 1
            proc = start_job(job, logs(job), gpus[slot % len(gpus)] if gpus else None, threads)
            running[slot] = job, proc, time.time()
            log(f"start {job.name} (worker {slot + 1}" + (", second try)" if tries[job.name] > 1 else ")"))
        time.sleep(0.2)
        for slot, (job, proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            if proc.returncode == 0 and finished(job):
                done.append((job.cost, time.time() - started))
                cost, seconds = map(sum, zip(*done))
                left = sum(j.cost for j in todo) + sum(j.cost for j, _, _ in running.values())
                eta = datetime.timedelta(seconds=round(left * seconds / cost / workers))
                log(f"done {job.name} ({done[-1][1]:.0f} s) | {len(done)}/{total} done, {len(running)} running, "
                    f"{len(todo)} left, {len(failed)} failed, ETA {eta}")
            elif tries[job.name] < 2:
                log(f"failed {job.name} (exit {proc.returncode}), trying once more: {tail(logs(job), 1)}")
                todo.appendleft(job)
            else:
                failed.append(job)
                log(f"failed {job.name} twice: see the end of the sweep")
    for job in failed:
        log(f"FAILED {job.name}: python finetune.py {' '.join(job.argv)}; the end of {logs(job)}:\n"
            + tail(logs(job), 5))
    return failed


def sweep_report(jobs, log=print):
    """The Table 1 printer over the sweep's finished runs (printed, and written as table1.md and table1.csv in OUT)
    and a GLUE submission zip per model (OUT/glue-submission-<model>.zip)."""
    results = [r for r in map(finished, jobs) if r]
    out = os.path.dirname(jobs[0].run_dir)
    markdown, csv_text = table(results)
    for name, text in (("table1.md", markdown + "\n"), ("table1.csv", csv_text)):
        with model.atomic_file(os.path.join(out, name), "w") as f:
            f.write(text)
    log(markdown + f"\n(written to {os.path.join(out, 'table1.md')} and table1.csv)")
    for name in dict.fromkeys(r["model"] for r in results):
        mine = [r for r in results if r["model"] == name]
        if any(r.get("test_predictions") for r in mine):
            path = os.path.join(out, f"glue-submission-{name}.zip")
            log(f"GLUE submission {path}: {', '.join(glue_submission(mine, path))}")


def sweep(argv, log=print) -> list[Job]:
    """python finetune.py sweep: Table 1 in one command (see the README). Returns the jobs that failed."""
    p = argparse.ArgumentParser(prog="finetune.py sweep", description="Finetune every task x encoder x seed with "
                                "the paper's recipe; other flags (--toy, --data, --out, --epochs, ...) go to every job")
    p.add_argument("--encoders", required=True, help="comma-separated --encoder values")
    p.add_argument("--tasks", default="all", help="glue (its 9 tasks), all (with swag and read) or a list: rte,mrpc")
    p.add_argument("--seeds", default="paper", help="paper (9 for RTE, 5 otherwise) or a number for every task")
    p.add_argument("--workers", type=int, help="jobs at a time (default: one per visible GPU, else 1)")
    p.add_argument("--shard", default="1/1", help="I/N: run the I-th of N disjoint shares of the jobs")
    a, extra = p.parse_known_args(argv)
    owned = {"--encoder", "--seed", "--seeds", "--name"} & {e.split("=")[0] for e in extra}
    if owned:
        raise ValueError(f"the sweep sets {', '.join(sorted(owned))} of each job itself: leave them out")
    tasks = {"glue": [t for t in TASK_ORDER if data.TASKS[t].glue_dir], "all": list(TASK_ORDER)}.get(a.tasks)
    tasks = tasks or a.tasks.split(",")
    for t in tasks:
        data.get_task(t)
    if not (a.seeds == "paper" or a.seeds.isdigit() and int(a.seeds) > 0):
        raise ValueError(f"--seeds {a.seeds}: give paper or a positive number")
    i, _, n = a.shard.partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise ValueError(f"--shard {a.shard}: give I/N with 1 <= I <= N, e.g. 1/4")
    if a.workers is not None and a.workers < 1:
        raise ValueError("--workers must be at least 1")
    jobs = sweep_jobs(a.encoders.split(","), tasks, None if a.seeds == "paper" else int(a.seeds), extra)
    failed = run_sweep(shard(jobs, int(i), int(n)), a.workers or max(1, len(visible_gpus())), log)
    sweep_report(jobs, log)
    return failed


# ---------------------------------------------------------------------------------------------------- benchmark

def bench(presets, batch_size, seq_len, steps, device):
    """Finetuning examples/s (forward + backward + AdamW step, then eval forward) of a classifier on random
    weights from model.PRESETS and random full-length inputs (batch_size, seq_len), in fp32 and, on CUDA, in bf16
    (the training default there): no download needed."""
    cuda = torch.device(device).type == "cuda"
    dtypes = ("fp32", "bf16") if cuda else ("fp32",)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {' and '.join(dtypes)}"
          f"{'' if cuda else ' only (bf16 is measured on CUDA)'}, batch {batch_size} x {seq_len} tokens, "
          f"median of {steps} steps after 1 warm-up")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for preset, dtype in ((p, d) for p in presets for d in dtypes):
        cfg, bf16 = model.PRESETS[preset], dtype == "bf16"
        torch.manual_seed(0)
        net = Finetuner(model.LanguageEncoder(cfg), "classification", 2).to(device)
        optimizer = adamw(net.parameters(), device)
        b = {"input_ids": torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
             "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (batch_size,), device=device)}
        times = {"train": [], "eval": []}
        for i in range(steps + 1):
            net.train()
            t = time.perf_counter()
            with autocast(device, bf16):
                loss = loss_fn("classification", net(b), b["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t_train = time.perf_counter() - t
            net.eval()
            t = time.perf_counter()
            with torch.no_grad(), autocast(device, bf16):
                net(b)
            sync()
            if i:
                times["train"].append(t_train)
                times["eval"].append(time.perf_counter() - t)
        train_s, eval_s = statistics.median(times["train"]), statistics.median(times["eval"])
        print(f"{preset:10s} {dtype} train {batch_size / train_s:8.1f} examples/s ({train_s * 1e3:.0f} ms/step), "
              f"eval {batch_size / eval_s:8.1f} examples/s")


# ---------------------------------------------------------------------------------------------------- CLI

def task_parser():
    p = argparse.ArgumentParser(prog="finetune.py", description="Finetune an encoder on a GLUE / SWAG / READ task "
                                "(App. C.2). Other commands: `sweep`, `table FILES...`, `bench`.")
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
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (the authors: 4 x 8)")
    p.add_argument("--max-len", type=int, default=RECIPE["max_len"])
    p.add_argument("--warmup", type=float, default=RECIPE["warmup"], help="warm-up share of the steps")
    p.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"])
    p.add_argument("--dropout", type=float, default=RECIPE["dropout"], help="dropout before the head")
    p.add_argument("--max-train-examples", type=int, help="train on the first N examples only (quick checks)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: 9 for RTE, 5 otherwise, 3 with --toy)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--out", default="runs", help="runs root: each seed writes OUT/<task>-<model>-seed<k>/")
    p.add_argument("--name", help="model name in the results and the table (default: from --encoder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="bf16 autocast with TF32, or plain fp32 "
                   "(default: bf16 on CUDA, fp32 on the CPU)")
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
    for name in ("epochs", "batch_size", "grad_accum", "seeds", "max_len", "max_train_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.grad_accum > args.batch_size:
        raise SystemExit("--grad-accum cannot exceed --batch-size: each micro-batch needs an example")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["table"]:
            if len(argv) < 2:
                raise SystemExit("usage: python finetune.py table runs/*/results.json")
            print(table([read_results(path) for path in argv[1:]])[0])
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
        elif argv[:1] == ["sweep"]:
            failed = sweep(argv[1:])
            if failed:
                raise SystemExit(f"{len(failed)} job(s) failed twice (listed above); rerun the same command to "
                                 f"retry them, finished jobs are skipped")
        else:
            run_seeds(parse_task_args(argv))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
