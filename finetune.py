"""Finetuning on GLUE, SWAG and READ (Sec. 2.4, 3, App. C.2, C.3): `finetune.py TASK` runs one task over its seeds,
`finetune.py sweep` runs every cell of Table 1 and `finetune.py table` prints it."""
import argparse
import collections
import copy
import csv
import ctypes
import datetime
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import typing
import zipfile
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn

import data
import model

GLUE = tuple(t for t in data.TASKS if data.TASKS[t].glue_dir)
TABLE1_GLUE = tuple(t for t in GLUE if t != "wnli")  # the tasks of Table 1's GLUE average
TABLE5_LR = {"base": (1e-4, 2e-5), "large": (5e-5, 1e-5)}  # Table 5: (RTE, MRPC and STS-B; the other tasks)
TABLE5_HIGH_LR = ("rte", "mrpc", "stsb")
PAPER_SEEDS = {"rte": 9}  # App. C.2: the median of 9 runs for RTE, 5 for the others
GRAD_CLIP = 1.0  # max gradient norm: the Hugging Face Trainer's default (max_grad_norm) the authors ran with
ADAM_EPS = 1e-8  # AdamW's epsilon: the Trainer's default (adam_epsilon)
CHECK_EVERY = 50  # optimizer steps between two looks at the loss on the host (each look waits for the device)


@dataclass
class FinetuneConfig:
    """Every setting of a finetuning command; PRESETS["paper"] is App. C.2's recipe, PRESETS["toy"] the toy kit's."""
    task: str = ""                      # one of data.TASKS
    data: str = "data"
    encoder: str = "bert-base"          # a name under DATA/ckpt/ or a hub-layout dir such as runs/<run>/xdbert
    clip: str = "clip"                  # the CLIP tokenizer feeding --full-model
    full_model: bool = False            # App. C.3: the whole cross-modal model of the adapt.py run of --encoder
    lr: float | None = None             # None: Table 5's rate for the task and the encoder's size
    layer_decay: float | None = None    # ELECTRA's layer-wise decay, e.g. 0.9; None: the authors' plain schedule
    epochs: int = 3
    batch_size: int = 32                # the whole batch; the authors ran 4 x 8 (--grad-accum 4)
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_len: int = 128
    warmup: float = 0.1                 # warm-up share of the optimizer steps
    weight_decay: float = 0.0
    dropout: float = 0.1                # before the head
    max_train_examples: int | None = None  # train on the first N examples only (quick checks)
    seeds: int | None = None            # None: 9 for RTE, 5 otherwise (App. C.2)
    seed: int = 0                       # the first seed
    out: str = "runs"
    name: str | None = None             # the table's row name; None: from --encoder
    device: str | None = None           # None: cuda when available
    dtype: str | None = None            # bf16 (autocast, TF32) or fp32; None: bf16 on CUDA, fp32 on the CPU
    verbose: bool = False               # print every epoch's dev scores
    preset: str = "paper"


# The toy encoders are 64 wide and pretrained for seconds (README, "The toy world"): Table 5's rates barely move them.
PRESETS = {"paper": FinetuneConfig(),
           "toy": FinetuneConfig(data="data/toy", encoder="bert-toy", clip="clip-toy", lr=1e-3, seeds=3, preset="toy")}
# What a run is: a rerun must match these, and a run's name lists the recipe settings that differ from its preset's.
RECIPE = {"lr": "lr", "layer_decay": "ld", "warmup": "wu", "epochs": "ep", "batch_size": "bs", "max_len": "len",
          "weight_decay": "wd", "dropout": "drop", "max_train_examples": "n"}
RUN_DEFINING = ("task", "encoder", "full_model", *RECIPE)
SWEEP_SETS = ("task", "encoder", "name", "seeds", "seed")  # a sweep gives each job its own


def parse_args(argv, sweep=False):
    """The command line -> FinetuneConfig; for a sweep, (the jobs' shared FinetuneConfig, the sweep's settings)."""
    p = argparse.ArgumentParser(prog="finetune.py" + " sweep" * sweep, description=__doc__, allow_abbrev=False,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--toy", action="store_true", help="the toy kit's preset: data/toy, bert-toy, lr 1e-3, 3 seeds")
    for f in fields(FinetuneConfig):
        if f.name != "preset" and not (sweep and f.name in SWEEP_SETS):
            kind = (typing.get_args(f.type) or (f.type,))[0]
            flag = f.name if f.name == "task" else "--" + f.name.replace("_", "-")
            p.add_argument(flag, **{"action": "store_true"} if kind is bool else {"type": kind})
    if sweep:
        p.add_argument("--encoders", required=True, help="comma-separated --encoder values")
        p.add_argument("--tasks", default="all", help="glue (its 9 tasks), all (with swag, read) or a list: rte,mrpc")
        p.add_argument("--seeds", default="paper", help="paper (9 for RTE, 5 otherwise) or a number for every task")
        p.add_argument("--workers", type=int, default=None, help="jobs at a time (default: one per GPU, else 1)")
        p.add_argument("--shard", default="1/1", help="I/N: run the I-th of N disjoint shares of the jobs")
    given = vars(p.parse_args(argv))
    own = {k: given.pop(k) for k in ("encoders", "tasks", "seeds", "workers", "shard")} if sweep else {}
    cfg = replace(PRESETS["toy" if given.pop("toy", False) else "paper"], **given)
    return (cfg, own) if sweep else check(cfg)


def check(cfg: FinetuneConfig) -> FinetuneConfig:
    """cfg, or a ValueError naming the first setting it cannot run with."""
    data.get_task(cfg.task)
    for name in ("epochs", "batch_size", "grad_accum", "seeds", "max_len", "max_train_examples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.grad_accum > cfg.batch_size:
        raise ValueError("--grad-accum cannot exceed --batch-size: each micro-batch needs an example")
    if cfg.dtype not in (None, "bf16", "fp32"):
        raise ValueError(f"--dtype {cfg.dtype}: choose bf16 or fp32")
    return cfg


def to_argv(cfg: FinetuneConfig) -> list[str]:
    """The command line that parse_args reads back as cfg: the task, --toy, then every setting the preset lacks."""
    preset, argv = PRESETS[cfg.preset], [cfg.task] + ["--toy"] * (cfg.preset == "toy")
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name not in ("task", "preset") and value != getattr(preset, f.name):
            argv += [flag] if value is True else [flag, str(value)]
    return argv


def settled(cfg: FinetuneConfig, size: str) -> FinetuneConfig:
    """cfg with Table 5's rate for its task and size ('base' or 'large'), the paper's seed count, device, dtype."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lr = TABLE5_LR[size][cfg.task not in TABLE5_HIGH_LR] if cfg.lr is None else cfg.lr
    return replace(cfg, lr=lr, seeds=cfg.seeds or PAPER_SEEDS.get(cfg.task, 5), device=device,
                   dtype=cfg.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32"))


def run_name(cfg: FinetuneConfig, variant: str, size: str) -> str:
    """--name or the encoder's run (X- for --full-model), then each recipe setting that differs: bert-base-ep1."""
    name, path = cfg.name, os.path.normpath(cfg.encoder)
    if not name:
        name = os.path.basename(os.path.dirname(path) if os.path.basename(path) == "xdbert" else path)
        name = "X-" + name if variant == "full-model" else name
    recipe, mine = settled(replace(PRESETS[cfg.preset], task=cfg.task), size), settled(cfg, size)
    return name + "".join(f"-{short}{getattr(mine, k):g}" for k, short in RECIPE.items()
                          if getattr(mine, k) != getattr(recipe, k))


def average_ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (scipy.stats.rankdata's 'average')."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse.ravel()]


def score(metric, labels, predictions) -> float:
    """A metric of data.Task.metrics; MCC (Gorodkin 2004), Pearson, Spearman as correlations, 0.0 if a side is flat."""
    y, p = np.asarray(labels, dtype=np.float64).ravel(), np.asarray(predictions, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions: score the same examples")
    if y.size == 0:
        raise ValueError("no examples to score: the dev set is empty")
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        raise ValueError("labels or predictions contain NaN or inf: training diverged, try a lower --lr")
    if metric in ("accuracy", "f1", "mcc") and not (np.array_equal(y, np.round(y)) and np.array_equal(p, np.round(p))):
        raise ValueError("classification metrics take class ids, and these labels or predictions are not whole "
                         "numbers: score regression outputs with pearson, spearman or rmse")
    if metric == "accuracy":
        return float(np.mean(y == p))
    if metric == "rmse":
        return float(np.sqrt(np.mean((y - p) ** 2)))
    if metric == "f1":
        tp, wrong = np.sum((y == 1) & (p == 1)), np.sum((y == 1) != (p == 1))
        return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0
    if metric == "mcc":
        classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
        y, p = np.eye(len(classes))[codes[:y.size]], np.eye(len(classes))[codes[y.size:]]  # (n, classes)
    elif metric == "spearman":
        y, p = average_ranks(y), average_ranks(p)
    elif metric != "pearson":
        raise ValueError(f"unknown metric {metric!r}: choose accuracy, f1, mcc, pearson, spearman or rmse")
    y, p = y.reshape(y.shape[0], -1), p.reshape(p.shape[0], -1)
    if not (np.ptp(y, axis=0).any() and np.ptp(p, axis=0).any()):  # tested before centring leaves rounding residue
        return 0.0
    y, p = y - y.mean(axis=0), p - p.mean(axis=0)
    return float(np.clip(np.sum(y * p) / math.sqrt(np.sum(y * y) * np.sum(p * p)), -1.0, 1.0))


def median_run(runs: list[dict]) -> dict:
    """Sec. 3's median of seeds: the run whose main metric is the median (of two middle runs, the worse)."""
    def quality(r):
        value = r["metrics"][r["main_metric"]]
        return -value if r["main_metric"].startswith("rmse") else value
    return sorted(runs, key=lambda r: (quality(r), r["seed"]))[(len(runs) - 1) // 2]


def shown(metric, value):
    """A metric as Table 1 prints it: x100 with 2 decimals, RMSE in target units with 4."""
    return f"{value:.4f}" if metric.startswith("rmse") else f"{100 * value:.2f}"


def format_metrics(metrics):
    return ", ".join(f"{k} {shown(k, v)}" for k, v in metrics.items())


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
    """Table 1 as (Markdown, CSV): median run, range and seed count per cell; GLUE averaged as the benchmark does."""
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in results:
        cells[r["model"]][r["task"]].append(r)
    tasks = [t for t in data.TASKS if any(t in row for row in cells.values())]
    glue = [t for t in tasks if t in GLUE]  # data.TASKS puts them first
    columns = glue + ["GLUE"] * any(set(TABLE1_GLUE) <= set(row) for row in cells.values()) + tasks[len(glue):]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = [("model", "task", "seeds", "median_seed", "metric", "value", "min", "max")]
    for name, row in cells.items():
        out = {}
        for t, runs in row.items():
            mid, main = median_run(runs), runs[0]["main_metric"]
            values = {k: [r["metrics"][k] for r in runs] for k in mid["metrics"]}
            spread = f" [{shown(main, min(values[main]))}, {shown(main, max(values[main]))}]" * (len(runs) > 1)
            out[t] = "/".join(shown(k, v) for k, v in mid["metrics"].items()) + f"{spread} ({len(runs)})"
            rows += [(name, t, len(runs), mid["seed"], k, v, min(values[k]), max(values[k]))
                     for k, v in mid["metrics"].items()]
        if set(TABLE1_GLUE) <= set(row):
            average = float(np.mean([np.mean(list(median_run(row[t])["metrics"].values())) for t in TABLE1_GLUE]))
            out["GLUE"] = f"{100 * average:.2f}"
            rows.append((name, "GLUE", "", "", "average", average, "", ""))
        lines.append(f"| {name} | " + " | ".join(out.get(c, "") for c in columns) + " |")
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return "\n".join(lines), text.getvalue()


class Finetuner(nn.Module):
    """A backbone with a task head (Sec. 2.4): logits (B, C), regression scores (B,) or choice scores (B, 4)."""

    def __init__(self, backbone, kind, num_labels, dropout=0.1, sentences=1):
        super().__init__()
        self.backbone, self.kind, electra = backbone, kind, False
        if isinstance(backbone, model.CrossModalTransformer):  # App. C.3: the [CLS] pooler MATCH trained, else fresh
            dim = backbone.language.config.hidden_size
            self.pooler = getattr(backbone, "match_pooler", None) or model.Pooler(dim).apply(model.init_weights)
        elif isinstance(backbone, model.CLIPTextTransformer):
            dim = backbone.config.projection_dim * sentences
        else:
            dim, electra = backbone.config.hidden_size, backbone.pooler is None
        layers = [("drop", nn.Dropout(dropout))]  # the head; ELECTRA's convention puts dense + GELU before its linear
        if electra:
            layers += [("dense", nn.Linear(dim, dim)), ("gelu", nn.GELU()), ("drop2", nn.Dropout(dropout))]
        outputs = num_labels if kind == "classification" else 1
        self.head = nn.Sequential(collections.OrderedDict(layers + [("out", nn.Linear(dim, outputs))]))
        self.head.apply(model.init_weights)

    def features(self, b):
        """One (B, D) vector per input: pooled [CLS], ELECTRA's [CLS], CLIP-T's pooled blocks or cross-modal [CLS]."""
        bb = self.backbone
        if isinstance(bb, model.CLIPTextTransformer):  # App. B: 2 blocks per sentence, the non-empty ones averaged
            B, n, C = b["clip_ids"].shape
            _, pooled = bb(b["clip_ids"].reshape(B * n, C))  # (B, n, 77) -> (B*n, 77) -> pooled (B*n, P)
            pooled = pooled.reshape(B, n // 2, 2, -1)  # -> (B, sentences, 2 blocks, P)
            used = (b["clip_mask"].sum(-1) > 0).reshape(B, n // 2, 2, 1).to(pooled.dtype)
            return ((pooled * used).sum(2) / used.sum(2).clamp(min=1)).flatten(1)  # (B, sentences * P)
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
        return nn.functional.mse_loss(outputs.float(), labels.float())
    return nn.functional.cross_entropy(outputs.float(), labels)


def layer_depth(name, num_layers, xlayers=0):
    """Clark et al. 2020's layer-wise decay depth (App. C.2): embeddings 0, layer i i+1, xlayer j L+1+j, rest L+X+2."""
    m = re.match(r"backbone\.(language\.|clip\.)?(embeddings|token_embedding|positional_embedding|blocks\.(\d+)|"
                 r"xlayers\.(\d+))(\.|$)", name)
    if m is None:
        return num_layers + xlayers + 2
    return int(m[3]) + 1 if m[3] else num_layers + 1 + int(m[4]) if m[4] else 0


def param_groups(net: Finetuner, lr, layer_decay=None):
    """AdamW groups: one group at lr (the plain recipe), or one per depth at lr * decay ** (top - depth)."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if layer_decay is None:
        return [{"params": [p for _, p in params], "lr": lr}]
    L, X = getattr(net.backbone, "language", net.backbone).config.num_layers, len(getattr(net.backbone, "xlayers", ()))
    groups = collections.defaultdict(list)
    for name, p in params:
        groups[layer_depth(name, L, X)].append(p)
    return [{"params": ps, "lr": lr * layer_decay ** (L + X + 2 - d)} for d, ps in sorted(groups.items())]


def adamw(groups, device, weight_decay=0.0):
    """App. C.2's AdamW, fused into one kernel on CUDA."""
    return torch.optim.AdamW(groups, weight_decay=weight_decay, eps=ADAM_EPS,
                             fused=True if torch.device(device).type == "cuda" else None)


def autocast(device, bf16):
    """bf16 autocast when asked; on CUDA the matmuls left in fp32 use TF32 with bf16 and full fp32 without."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bf16
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)


def trimmed(batch, device):
    """The batch without the padding columns all its rows share, (.., 128) -> (.., T), copied to `device`."""
    ends = {m: max(1, int(batch[m].sum(-1).max())) for m in ("attention_mask", "clip_mask") if m in batch}
    out = {k: v if k == "labels" else v[..., :ends["clip_mask" if k.startswith("clip_") else "attention_mask"]]
           for k, v in batch.items()}
    if torch.device(device).type == "cuda":
        out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return out


@torch.no_grad()
def predict(net, tensors, cfg, batch_size=128):
    """Dev or test predictions: class ids, regression scores or chosen endings, as a numpy vector."""
    net.eval()
    rows = torch.arange(len(next(iter(tensors.values()))))
    with autocast(cfg.device, cfg.dtype == "bf16"):
        out = torch.cat([net(trimmed({k: v[part] for k, v in tensors.items()}, cfg.device))
                         for part in rows.split(batch_size)])
    return (out.float() if net.kind == "regression" else out.argmax(-1)).cpu().numpy()


def train(net, train_set, dev_sets, cfg: FinetuneConfig, seed, log=None):
    """Finetune `net` (App. C.2; cfg settled), scoring dev_sets after each epoch -> (epoch records, seconds)."""
    net.to(cfg.device)
    n, bf16, micro = len(train_set["labels"]), cfg.dtype == "bf16", math.ceil(cfg.batch_size / cfg.grad_accum)
    steps = math.ceil(n / cfg.batch_size)  # per epoch
    optimizer = adamw(param_groups(net, cfg.lr, cfg.layer_decay), cfg.device, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: model.linear_warmup_decay(step, steps * cfg.epochs, cfg.warmup))
    order, params = torch.Generator().manual_seed(seed), [p for p in net.parameters() if p.requires_grad]
    history, seconds = [], 0.0
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        start, losses = time.perf_counter(), []  # one 0-d device tensor per step
        for step, rows in enumerate(torch.randperm(n, generator=order).split(cfg.batch_size)):
            losses.append(0.0)
            for part in rows.split(micro):  # gradient accumulation: 32 = 4 x 8 in the authors' runs
                b = trimmed({k: v[part] for k, v in train_set.items()}, cfg.device)
                with autocast(cfg.device, bf16):
                    loss = loss_fn(net.kind, net(b), b["labels"]) * (len(part) / len(rows))
                loss.backward()
                losses[-1] = losses[-1] + loss.detach()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            checked = (step + 1) % CHECK_EVERY == 0 or step == steps - 1  # one host sync per window of steps
            if checked and not torch.isfinite(torch.stack(losses)).all():
                i = next(i for i, loss in enumerate(losses) if not math.isfinite(loss))
                raise FloatingPointError(f"the training loss became {float(losses[i])} at step "
                                         f"{(epoch - 1) * steps + i + 1}: finetune again with a lower --lr")
        seconds += time.perf_counter() - start
        predictions = {suffix: predict(net, tensors, cfg) for suffix, tensors in dev_sets.items()}
        metrics = {m + s: score(m, dev_sets[s]["labels"].numpy(), p) for s, p in predictions.items()
                   for m in data.TASKS[cfg.task].metrics}
        history.append({"epoch": epoch, "train_loss": float(torch.stack(losses).double().mean()), "metrics": metrics,
                        "predictions": predictions})
        if log:
            log(f"  epoch {epoch}: loss {history[-1]['train_loss']:.4f}, " + format_metrics(metrics))
    return history, seconds


def load_backbone(cfg: FinetuneConfig):
    """(backbone, variant, BERT tokenizer, CLIP tokenizer) of --encoder, or of its crossmodal.pt (App. C.3)."""
    if not cfg.full_model:
        path = data.checkpoint_dir(cfg.encoder, cfg.data)
        backbone = model.from_hf(path)
        if isinstance(backbone, model.CLIPTextTransformer):
            return backbone, "clip", None, data.clip_tokenizer(path)
        return backbone, "encoder", data.bert_tokenizer(path), None
    run = cfg.encoder.rstrip("/")
    path = next((p for p in (run, os.path.dirname(run)) if os.path.isfile(os.path.join(p, "crossmodal.pt"))), None)
    if path is None:
        raise FileNotFoundError(f"--full-model needs crossmodal.pt in {run} or next to it: give --encoder "
                                f"runs/<run>/xdbert of a run of `python adapt.py`")
    crossmodal = model.load_crossmodal(os.path.join(path, "crossmodal.pt"))
    if crossmodal.clip is None:
        raise ValueError(f"{os.path.join(path, 'crossmodal.pt')} is the MLM-only baseline (no CLIP-T): finetune its "
                         f"xdbert/ without --full-model")
    return (crossmodal, "full-model", data.bert_tokenizer(os.path.join(path, "xdbert")),
            data.clip_tokenizer(data.checkpoint_dir(cfg.clip, cfg.data)))


def model_size(backbone):
    """Table 5's columns: 'large' for 1024-wide encoders, else 'base' (CLIP-T counts as base)."""
    return "large" if getattr(getattr(backbone, "language", backbone).config, "hidden_size", 0) >= 1024 else "base"


def run_record(cfg: FinetuneConfig, name, seed) -> dict:
    """What identifies one seed's run: task, model (the table's row), seed and the settings of its own command."""
    return {"task": cfg.task, "model": name, "seed": seed, "config": asdict(replace(cfg, seed=seed, seeds=1))}


def differences(old, new) -> str:
    """'setting old there, new here, ...' for the model, seed and run-defining settings two results differ in."""
    a, b = ({**r.get("config", {}), "model": r["model"], "seed": r["seed"]} for r in (old, new))
    return ", ".join(f"{k} {a.get(k)!r} there, {b[k]!r} here" for k in ("model", "seed", *RUN_DEFINING)
                     if a.get(k) != b[k])


SUFFIXES = {"": "", "matched": "_m", "mismatched": "_mm", "ax": "_ax"}  # a split's metric suffix (MNLI's dev, test)


def submission_tsv(task, ids, predictions, label_names):
    """GLUE's index<TAB>prediction file: STS-B's floats, else the labels as the task's files write them."""
    values = (f"{float(p):.6f}" if task == "stsb" else label_names[int(p)] for p in predictions)
    return "".join(f"{i}\t{v}\n" for i, v in zip(["index", *ids], ["prediction", *values]))


def write_run(run_dir, result, net, dev, test, final, cfg):
    """Dev predictions (for pwcca.py grounding), GLUE test predictions, then results.json, which marks a done run."""
    task = data.TASKS[cfg.task]
    for suffix, (examples, tensors) in dev.items():
        lines = [{"index": i, "text_a": ex.text_a, "text_b": ex.text_b, "label": y.item(), "prediction": p.item()}
                 for i, (ex, y, p) in enumerate(zip(examples, tensors["labels"].numpy(), final["predictions"][suffix]))]
        name = "dev_mismatched_predictions.jsonl" if suffix == "_mm" else "dev_predictions.jsonl"
        with model.atomic_file(os.path.join(run_dir, name), "w") as out:
            out.write("".join(json.dumps(line) + "\n" for line in lines))
    result["test_predictions"] = []
    for suffix, (examples, tensors) in test.items():
        name = "AX.tsv" if suffix == "_ax" else f"{task.glue_dir}{suffix.replace('_', '-')}.tsv"
        result["test_predictions"].append(os.path.join(run_dir, "glue_test", name))
        with model.atomic_file(result["test_predictions"][-1], "w") as out:
            out.write(submission_tsv(cfg.task, [ex.guid for ex in examples], predict(net, tensors, cfg),
                                     task.label_names))
    with model.atomic_file(os.path.join(run_dir, "results.json"), "w") as out:
        out.write(json.dumps(result, indent=2) + "\n")


def run_seeds(cfg: FinetuneConfig, log=print) -> list[dict]:
    """Load and encode once, then finetune a fresh copy per seed; prints each run and the median run."""
    task = data.TASKS[cfg.task]
    backbone, variant, bert_tok, clip_tok = load_backbone(cfg)
    name, cfg = run_name(cfg, variant, model_size(backbone)), settled(cfg, model_size(backbone))
    runs = {os.path.join(cfg.out, f"{cfg.task}-{name}-seed{s}"): run_record(cfg, name, s)
            for s in range(cfg.seed, cfg.seed + cfg.seeds)}
    for run_dir, record in runs.items():  # before any training
        if (old := results_in(run_dir)) is not None and (differ := differences(old, record)):
            raise ValueError(f"{run_dir} holds a run with other settings ({differ}): give another --name or --out, "
                             f"or delete it")
    sets = collections.defaultdict(dict)  # train, dev, test: {metric suffix: (examples, tensors)}
    for split, file in task.splits.items():  # test sets only where GLUE's test file is there
        kind, _, which = split.partition("_")
        if kind == "test" and not (task.glue_dir and os.path.isfile(os.path.join(cfg.data, task.folder, file))):
            continue
        examples = data.read_task(cfg.task, split, cfg.data)[:cfg.max_train_examples if kind == "train" else None]
        sets[kind][SUFFIXES[which]] = examples, data.encode(examples, cfg.task, bert_tok, cfg.max_len, clip_tok)
    (_, train_set), dev, test = sets["train"][""], sets["dev"], sets["test"]
    sentences = train_set["clip_ids"].shape[-2] // 2 if variant == "clip" else 1
    n_train, results = len(train_set["labels"]), []
    for run_dir, record in runs.items():
        torch.manual_seed(record["seed"])  # head initialisation and dropout
        net = Finetuner(copy.deepcopy(backbone), task.kind, task.num_labels, cfg.dropout, sentences)
        history, seconds = train(net, train_set, {s: t for s, (_, t) in dev.items()}, cfg, record["seed"],
                                 log if cfg.verbose else None)
        result = record | {"metrics": history[-1]["metrics"], "main_metric": task.metrics[0] + next(iter(dev)),
                           "epochs": [{k: h[k] for k in ("epoch", "train_loss", "metrics")} for h in history],
                           "train_examples": n_train, "train_seconds": round(seconds, 3),
                           "train_examples_per_second": round(n_train * cfg.epochs / seconds, 1),
                           "dev_predictions": os.path.join(run_dir, "dev_predictions.jsonl")}
        write_run(run_dir, result, net, dev, test, history[-1], cfg)
        results.append(result)
        log(f"{cfg.task} {name} seed {record['seed']}: {format_metrics(result['metrics'])} ({seconds:.1f} s, "
            f"{result['train_examples_per_second']:.0f} train examples/s) -> {run_dir}")
    middle = median_run(results)
    log(f"{cfg.task} {name} median of {len(results)} seed(s) by {middle['main_metric']}: "
        f"{format_metrics(middle['metrics'])} (seed {middle['seed']})")
    return results


Job = collections.namedtuple("Job", "name cfg expected cost log")  # cost: train file bytes x epochs x parameters


def sweep_jobs(base: FinetuneConfig, encoders, tasks, seeds=None) -> list[Job]:
    """The (encoder, task, seed) jobs of a sweep, each a one-seed config; seeds None: the paper's (App. C.2)."""
    jobs = []
    for encoder in encoders:
        backbone, variant, *_ = load_backbone(replace(base, encoder=encoder))
        size, params = model_size(backbone), model.count_parameters(backbone)
        for task in tasks:
            cfg = check(replace(base, task=task, encoder=encoder, seeds=1))
            spec, name = data.TASKS[task], run_name(cfg, variant, size)
            train_file = os.path.join(cfg.data, spec.folder, spec.splits["train"])
            cost = (os.path.getsize(train_file) if os.path.isfile(train_file) else 1) * cfg.epochs * params
            for seed in range(seeds or PAPER_SEEDS.get(task, 5)):
                run = f"{task}-{name}-seed{seed}"
                jobs.append(Job(run, replace(cfg, seed=seed), run_record(settled(cfg, size), name, seed), cost,
                                os.path.join(cfg.out, "sweep-logs", run + ".log")))
    return jobs


def shard(jobs, i, n) -> list[Job]:
    """--shard I/N: every N-th job of the largest-first list from the I-th (disjoint shares, each with big jobs)."""
    return sorted(jobs, key=lambda j: -j.cost)[i - 1::n]


def finished(job):
    """The job's results when its run is complete and was made with the job's settings, else None."""
    r = results_in(os.path.join(job.cfg.out, job.name))
    return r if r is not None and not differences(r, job.expected) else None


def start_job(job, gpu, threads):
    """`python finetune.py TASK ...` on one GPU or `threads` threads, output to job.log, dying with the sweep."""
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    env |= {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    sweep_pid, prctl = os.getpid(), getattr(ctypes.CDLL(None), "prctl", None)

    def die_with_sweep():
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != sweep_pid:  # the sweep died before the request took effect
            os._exit(1)

    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log:
        print(f"$ python finetune.py {' '.join(to_argv(job.cfg))}", file=log, flush=True)
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), *to_argv(job.cfg)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_sweep)


def run_sweep(jobs, workers=None, log=print) -> list[Job]:
    """Run the unfinished jobs, `workers` at a time (default: one per GPU), failed ones twice -> jobs failing twice."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    gpus = gpus.split(",") if torch.cuda.is_available() else []
    workers = workers or max(1, len(gpus))
    todo = collections.deque(j for j in jobs if not finished(j))
    log(f"sweep: {len(jobs)} jobs, {len(jobs) - len(todo)} finished before, {len(todo)} to run on {workers} worker(s)")

    def tail(job, n):
        with open(job.log, encoding="utf-8", errors="replace") as f:
            return "".join(collections.deque(f, n)).rstrip()

    running, tries, failed, done, total = {}, collections.Counter(), [], [], len(todo)
    while todo or running:
        for slot in [s for s in range(workers) if s not in running][:len(todo)]:
            job = todo.popleft()
            tries[job.name] += 1
            gpu = gpus[slot % len(gpus)] if gpus else None
            running[slot] = job, start_job(job, gpu, max(1, (os.cpu_count() or 1) // workers)), time.time()
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
                log(f"failed {job.name} (exit {proc.returncode}), trying once more: {tail(job, 1)}")
                todo.appendleft(job)
            else:
                failed.append(job)
                log(f"failed {job.name} twice: see the end of the sweep")
    for job in failed:
        log(f"FAILED {job.name}: python finetune.py {' '.join(to_argv(job.cfg))}; the end of {job.log}:\n"
            + tail(job, 5))
    return failed


def sweep(argv, log=print) -> list[Job]:
    """python finetune.py sweep: its share of the jobs, then Table 1 (OUT/table1.md, .csv) and GLUE zips per model."""
    base, s = parse_args(argv, sweep=True)
    if not (s["seeds"] == "paper" or s["seeds"].isdigit() and int(s["seeds"]) > 0):
        raise ValueError(f"--seeds {s['seeds']}: give paper or a positive number")
    i, _, n = s["shard"].partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise ValueError(f"--shard {s['shard']}: give I/N with 1 <= I <= N, e.g. 1/4")
    if s["workers"] is not None and s["workers"] < 1:
        raise ValueError("--workers must be at least 1")
    tasks = {"glue": list(GLUE), "all": list(data.TASKS)}.get(s["tasks"]) or s["tasks"].split(",")
    jobs = sweep_jobs(base, s["encoders"].split(","), tasks, None if s["seeds"] == "paper" else int(s["seeds"]))
    failed = run_sweep(shard(jobs, int(i), int(n)), s["workers"], log)
    results = [r for r in map(finished, jobs) if r]
    markdown, csv_text = table(results)
    for file, text in (("table1.md", markdown + "\n"), ("table1.csv", csv_text)):
        with model.atomic_file(os.path.join(base.out, file), "w") as f:
            f.write(text)
    log(markdown + f"\n(written to {os.path.join(base.out, 'table1.md')} and table1.csv)")
    for name in dict.fromkeys(r["model"] for r in results if r.get("test_predictions")):  # each GLUE task's median run
        path, files = os.path.join(base.out, f"glue-submission-{name}.zip"), []
        with model.atomic_file(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for runs in filter(None, ([r for r in results if (r["model"], r["task"]) == (name, t)] for t in GLUE)):
                for tsv in median_run(runs).get("test_predictions", []):
                    files.append(os.path.basename(tsv))
                    z.write(os.path.join(median_run(runs)["run_dir"], "glue_test", files[-1]), files[-1])
        log(f"GLUE submission {path}: {', '.join(files)}")
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["table"]:
            if len(argv) < 2:
                raise ValueError("usage: python finetune.py table runs/*/results.json")
            print(table([read_results(path) for path in argv[1:]])[0])
        elif argv[:1] == ["sweep"]:
            if failed := sweep(argv[1:]):
                raise SystemExit(f"{len(failed)} job(s) failed twice (listed above); rerun the same command to "
                                 f"retry them, finished jobs are skipped")
        else:
            run_seeds(parse_args(argv))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
