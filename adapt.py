"""Sec. 2.3 + App. C.1: cross-modal adaptation of BERT/ELECTRA with CLIP's text transformer (XDBERT).

Trains model.CrossModalTransformer on data.py's windows with the sum of the MLM, MATCH and CLIPTC losses and writes
runs/<run>/: xdbert/ (for finetune.py --encoder), xdbert-epoch<e>/, crossmodal.pt, ckpt.pt, log.jsonl (README).
"""
import argparse
import functools
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import model as xm

# Dense bf16 tensor-core peak per device, FLOP/s (vendor data sheets), matched against the device name in this order
PEAK_FLOPS = ((r"H200 NVL|H100 NVL", 835e12), (r"H100 PCIe", 756e12), (r"H100|H200|GH200", 989e12),
              (r"A100", 312e12), (r"L40S", 362e12), (r"A10G", 70e12), (r"A10\b", 125e12), (r"L4\b", 121e12),
              (r"V100", 125e12), (r"RTX 4090", 165e12), (r"RTX 3090", 71e12), (r"T4\b", 65e12))
LOGGED = ("loss", "mlm", "match", "cliptc", "match_acc")  # train_step's means, in this order
DROPOUT_SEED_STRIDE = 1_000_003  # dropout seed of micro-batch m: seed + stride x (m + 1), distinct for every m


@dataclass
class AdaptConfig:
    """Every setting of an adaptation run; PRESETS["paper"] is App. C.1's, PRESETS["toy"] the toy kit's."""
    data: str = "data"                  # data root: ckpt/, wikitext-103-raw/, cache/
    encoder: str = "bert-base"          # a name under DATA/ckpt/ or a hub-layout directory
    clip: str = "clip"
    corpus: str | None = None           # default DATA/wikitext-103-raw/wiki.train.raw
    cache: str | None = None            # an existing data.build_cache directory
    all_lines: bool = False             # keep WikiText's headings and short lines (data.wikitext_line)
    tasks: tuple[str, ...] = xm.ADAPT_TASKS  # Table 3: any subset of mlm, match, cliptc
    xlayers: int = 2                    # cross-modal layers (App. B: 2; Table 3: 1)
    no_clip: bool = False               # Sec. 3's fair baseline: the language encoder alone, plain MLM
    schedule_epochs: float = 40.0       # App. C.1: max_epoch = 40
    epochs: float = 1.0                 # where the run stops (App. C.1: 1)
    save_epochs: tuple[float, ...] = ()  # epochs whose adapted encoder is also kept (Table 3: 1, 2, 20)
    seq_len: int = 512                  # App. B
    clip_blocks: int = 9                # App. B: 9 x 77
    global_batch: int = 320             # App. C.1: about 300 (320 divides over 8 GPUs)
    micro_batch: int | None = None      # per device and micro-step; None: the largest that fits (micro_batch_size)
    lr: float = 1e-4
    warmup: float = 0.05
    weight_decay: float = 0.01          # on the matrices (the paper is silent)
    clip_grad: float = 1.0              # the authors' code
    seed: int = 0
    dtype: str = "auto"                 # auto: bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU
    compile: bool = False
    device: str | None = None           # default cuda when available
    name: str | None = None             # default <encoder>-<tasks>
    out: str = "runs"
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    ckpt_every: int = 200
    max_steps: int | None = None
    peak_flops: float | None = None


# The toy kit (README, "The toy world"): 16-token windows in one CLIP block, about 1,060 steps of 32 per epoch; run to
# epoch 2 of the paper's schedule shape, as MATCH needs about 2,000 such steps to pass 90% from these encoders.
PRESETS = {"paper": AdaptConfig(),
           "toy": AdaptConfig(data="data/toy", encoder="bert-toy", clip="clip-toy", name="toy", seq_len=16,
                              clip_blocks=1, global_batch=32, micro_batch=32, lr=4e-3, epochs=2.0)}
# What a resumed run must share with its checkpoint (the learning rate and where the run stops may change)
RUN_DEFINING = ("encoder", "clip", "corpus", "cache", "all_lines", "tasks", "xlayers", "no_clip", "schedule_epochs",
                "seq_len", "clip_blocks", "global_batch", "warmup", "weight_decay", "clip_grad", "seed")
HELP = {"all_lines": "keep WikiText's headings and short lines", "tasks": "Table 3: a subset of mlm,match,cliptc",
        "no_clip": "Sec. 3's fair baseline: the encoder alone, plain MLM", "save_epochs": "e.g. 1,2"}


def parse_args(argv=None) -> AdaptConfig:
    """The command line -> a checked AdaptConfig: the paper's preset (or --toy's), then the flags given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    p.add_argument("--toy", action="store_true", help="the toy kit's preset: data/toy, bert-toy + clip-toy")
    for f in fields(AdaptConfig):
        kind, flag = (typing.get_args(f.type) or (f.type,))[0], "--" + f.name.replace("_", "-")
        if typing.get_origin(f.type) is tuple:  # comma-separated
            kind = functools.partial(lambda k, s: tuple(map(k, s.split(","))), kind)
        p.add_argument(flag, help=HELP.get(f.name), **{"action": "store_true"} if kind is bool else {"type": kind})
    given = vars(p.parse_args(argv))
    cfg = replace(PRESETS["toy" if given.pop("toy", False) else "paper"], **given)
    if cfg.no_clip:
        cfg = replace(cfg, tasks=("mlm",), xlayers=0)
    check(cfg)
    return replace(cfg, tasks=tuple(t for t in xm.ADAPT_TASKS if t in cfg.tasks))


def check(cfg: AdaptConfig):
    """ValueError naming the first setting that the model or the data cannot take."""
    unknown = set(cfg.tasks) - set(xm.ADAPT_TASKS)
    problems = [
        (unknown or not cfg.tasks, f"--tasks {','.join(sorted(unknown)) or '(empty)'}: choose a subset of "
                                   f"{','.join(xm.ADAPT_TASKS)}"),
        (cfg.xlayers < (0 if cfg.no_clip else 1), f"--xlayers {cfg.xlayers}: at least 1 cross-modal layer"),
        (cfg.seq_len < 8, f"--seq-len {cfg.seq_len}: windows need at least 8 tokens"),
        (cfg.clip_blocks < 1, f"--clip-blocks {cfg.clip_blocks}: at least 1 block of 77"),
        (cfg.epochs <= 0 or cfg.schedule_epochs <= 0, "--epochs and --schedule-epochs must be positive"),
        (cfg.epochs > cfg.schedule_epochs, f"--epochs {cfg.epochs:g} runs past the schedule of "
                                           f"{cfg.schedule_epochs:g} epochs: raise --schedule-epochs"),
        (any(not 0 < e <= cfg.epochs for e in cfg.save_epochs), f"--save-epochs must lie in (0, --epochs "
                                                                 f"{cfg.epochs:g}]"),
        (cfg.max_steps is not None and cfg.max_steps < 1, "--max-steps must be at least 1"),
        (min(cfg.global_batch, 1 if cfg.micro_batch is None else cfg.micro_batch, cfg.log_every) < 1,
         "--global-batch, --micro-batch and --log-every must be at least 1"),
        (cfg.ckpt_every < 0, "--ckpt-every must be 0 (at the end only) or more"),
        (cfg.dtype not in ("auto", "float32", "bfloat16", "float16"), f"--dtype {cfg.dtype}: choose auto, float32, "
                                                                      f"bfloat16 or float16"),
        (cfg.lr <= 0 or cfg.clip_grad <= 0 or cfg.weight_decay < 0 or not 0 <= cfg.warmup < 1,
         "--lr and --clip-grad must be positive, --weight-decay non-negative, --warmup in [0, 1)")]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def setup_distributed(cfg):
    """torchrun's env vars -> (rank, world, device); one process when they are absent. The long timeout lets the
    other ranks wait while rank 0 builds the WikiText cache (minutes)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} is not divisible by the world size {world}: pass "
                         f"--global-batch as a multiple of {world}")
    device_type = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ:  # under torchrun, DDP even for one process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def micro_batch_size(cfg, world, device):
    """--micro-batch, or the largest divisor of the per-device batch up to 16 on a CPU and, on a GPU, up to 64
    sequences or one per 2 GiB of its memory (a 512-token training sequence takes about 0.5 GiB in bf16)."""
    per_rank = cfg.global_batch // world
    if cfg.micro_batch:
        if per_rank % cfg.micro_batch:
            raise ValueError(f"the {per_rank} sequences per device of global batch {cfg.global_batch} do not split "
                             f"into micro-batches of --micro-batch {cfg.micro_batch}: pass one dividing {per_rank}")
        return cfg.micro_batch
    cap = 16 if device.type != "cuda" else min(64, torch.cuda.get_device_properties(device).total_memory >> 31)
    return max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)


def autocast_setup(dtype_arg, device):
    """(autocast context, GradScaler, dtype name): "auto" is bf16 on CUDA where supported, else fp16 with the scaler,
    and fp32 on a CPU."""
    if dtype_arg == "auto" and device.type == "cuda":
        dtype_arg = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    dtype = torch.float32 if dtype_arg == "auto" else getattr(torch, dtype_arg)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    return ctx, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The permutation of the n windows for an epoch, the same on every rank (DistributedSampler's rule)."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


def micro_batches(order, step, global_batch, batch_size, rank, world):
    """Indices of this rank's micro-batches of optimizer step `step`: micro-batch m of the step's G examples goes to
    rank m % world, so the union over ranks, and the order of accumulation per micro-batch id, are world-independent.
    Returns [(micro-batch id, indices (B,))]."""
    chunk = order[step * global_batch:(step + 1) * global_batch]      # (G,)
    n_micro = global_batch // batch_size
    return [(m, chunk[m * batch_size:(m + 1) * batch_size]) for m in range(rank, n_micro, world)]


def peak_flops(device_name):
    """The PEAK_FLOPS entry of a CUDA device name ("NVIDIA H100 PCIe" -> 756e12), None if unknown."""
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, device_name)), None)


def device_peak(cfg, device):
    """--peak-flops, else the CUDA device's PEAK_FLOPS entry; None on a CPU or an unknown device."""
    return cfg.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)


def unread_streams(m):
    """(language, CLIP): is that stream of the last cross-modal layer read by no chosen task? (MLM and MATCH read the
    language stream, CLIPTC the CLIP one; an unread stream's last sublayers get no gradient.)"""
    if not len(m.xlayers):
        return False, False
    return not {"mlm", "match"} & set(m.tasks), "cliptc" not in m.tasks


def flops_per_sequence(m, seq_len, clip_blocks, clip_tokens=None, clip_width=None):
    """Training FLOPs of one sequence, for MFU (as nanoGPT / PaLM App. B): 6 x the multiply-accumulates (MACs) of
    every weight matrix on the tokens it acts on, plus the attention scores and mixing (2 x width x queries x keys),
    over the language encoder, CLIP-T (attention within each block), the cross-modal layers (both streams, both
    directions) and the heads on their prediction slots; the last cross-modal layer's stream that no chosen task
    reads counts its forward (2 x MACs) only. A block has clip_width positions (default 77); clip_tokens replaces the
    clip_blocks x clip_width CLIP positions by the real tokens (MFU over real tokens: padding is not useful work)."""
    lc = m.language.config
    T, H, E, F = seq_len, lc.hidden_size, lc.embedding_size or lc.hidden_size, lc.ffn_size
    train_macs = T * (lc.num_layers * (4 * H * H + 2 * H * F) + (E * H if E != H else 0))  # + ELECTRA-small projection
    train_macs += lc.num_layers * 2 * H * T * T
    forward_macs = 0
    if "mlm" in m.tasks:                   # the MLM head runs on the prediction slots only (model.token_loss)
        train_macs += data.prediction_slots(T - 2, data.MASK_PROB) * (H * E + E * lc.vocab_size)
    if m.clip is not None:
        cc, C = m.clip.config, clip_width or m.clip.config.context_length
        W, P, N = cc.width, cc.projection_dim, clip_blocks * C if clip_tokens is None else clip_tokens  # N positions
        train_macs += N * (cc.num_layers * (4 * W * W + 2 * W * cc.ffn_size) + W * P)
        train_macs += N * cc.num_layers * 2 * W * C            # CLIP-T attends within each block of C
        # a cross-modal layer, per stream: cross-attention (Q, out on its tokens; K, V on the other's), self-attention
        lang = T * (2 * H * H + 4 * H * H + 2 * H * F) + N * 2 * P * H + 2 * H * T * N + 2 * H * T * T
        vis = N * (2 * P * P + 4 * P * P + 2 * P * F) + T * 2 * H * P + 2 * P * N * T + 2 * P * N * N
        lang_unread, vis_unread = unread_streams(m)
        forward_macs = lang * lang_unread + vis * vis_unread  # the last layer's unread stream: forward only
        train_macs += len(m.xlayers) * (lang + vis) - forward_macs
        if "cliptc" in m.tasks:            # CLIPTC on its prediction slots
            train_macs += data.prediction_slots(clip_blocks * data.CLIP_BLOCK_TOKENS, data.MASK_PROB) * \
                (P * W + W * cc.vocab_size)
    return 6 * train_macs + 2 * forward_macs


def flop_rates(m, cfg, clip_width, step_s, clip_real=None):
    """Training FLOP/s per device at step_s seconds per step: over all CLIP positions, and over clip_real CLIP tokens
    per sequence (None: all positions)."""
    per_s = cfg.global_batch / step_s / world_size()
    return tuple(flops_per_sequence(m, cfg.seq_len, cfg.clip_blocks, n, clip_width) * per_s for n in (None, clip_real))


def prepare_data(cfg, rank, lang_dir, clip_dir):
    """data.build_cache on rank 0, then on the other ranks, which find it built -> data.AdaptationData."""
    if cfg.cache:
        if not os.path.isdir(cfg.cache):
            raise FileNotFoundError(f"no cache at {cfg.cache}: drop --cache to build one from --corpus")
        return data.AdaptationData(cfg.cache)
    cache_root = os.path.join(cfg.data, "cache")
    if rank == 0:
        xm.sweep_stale(cache_root)
    elif dist.is_initialized():
        dist.barrier()  # wait for rank 0's build
    built = data.build_cache(cfg.corpus or os.path.join(cfg.data, "wikitext-103-raw", "wiki.train.raw"), lang_dir,
                             clip_dir, cache_root, seq_len=cfg.seq_len, n_blocks=cfg.clip_blocks,
                             log=print if rank == 0 else lambda _: None, all_lines=cfg.all_lines)
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    return data.AdaptationData(built)


def make_optimizer(raw_model, cfg, device):
    """AdamW, weight decay on the matrices only (not biases, LayerNorms); fused on CUDA."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def wrap(raw_model, cfg, device):
    """DDP, then torch.compile (PyTorch's DDP notes: TorchDynamo then splits the graph at the gradient buckets); DDP
    looks for unused parameters when an ablation leaves a stream of the last cross-modal layer unread."""
    model = raw_model
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=any(unread_streams(raw_model)))
    return torch.compile(model) if cfg.compile else model


class Run:
    """An adaptation run as train() drives it: its folder, data, model and optimizer, and App. C.1's schedule in
    optimizer steps; resumed from ckpt.pt or started in a new folder."""

    def __init__(self, cfg: AdaptConfig):
        tasks = "noclip" if cfg.no_clip else "+".join(cfg.tasks)
        self.cfg = cfg
        self.dir = os.path.join(cfg.out, cfg.name or f"{os.path.basename(os.path.normpath(cfg.encoder))}-{tasks}")
        self.ckpt_path, self.log_path = os.path.join(self.dir, "ckpt.pt"), os.path.join(self.dir, "log.jsonl")
        self.rank, world, self.device = setup_distributed(cfg)
        self.micro = micro_batch_size(cfg, world, self.device)  # sequences per device and micro-step
        self.lang_dir, clip_dir = data.checkpoint_dir(cfg.encoder, cfg.data), data.checkpoint_dir(cfg.clip, cfg.data)
        torch.manual_seed(cfg.seed)  # the same fresh cross-modal layers and heads on every rank and every run
        self.raw = xm.load_crossmodal_from_hf(self.lang_dir, None if cfg.no_clip else clip_dir, cfg.xlayers,
                                              cfg.tasks).to(self.device)
        if cfg.seq_len > self.raw.language.config.max_positions:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the {self.raw.language.config.max_positions} positions "
                             f"of {self.lang_dir}")
        self.dataset = prepare_data(cfg, self.rank, self.lang_dir, clip_dir)
        per_epoch = self.steps_per_epoch = len(self.dataset) // cfg.global_batch
        if per_epoch == 0:
            raise ValueError(f"the corpus gives {len(self.dataset)} windows, fewer than one global batch of "
                             f"{cfg.global_batch}: pass a smaller --global-batch or a larger --corpus")
        total = max(1, round(cfg.schedule_epochs * per_epoch))
        self.schedule = {"total": total, "warmup": math.ceil(cfg.warmup * total)}
        self.stop = min(total, max(1, round(cfg.epochs * per_epoch)), cfg.max_steps or total)  # of this invocation
        self.saves = {max(1, round(e * per_epoch)): f"xdbert-epoch{e:g}" for e in cfg.save_epochs}  # step -> folder
        self.optimizer = make_optimizer(self.raw, cfg, self.device)
        self.autocast, self.scaler, dtype_name = autocast_setup(cfg.dtype, self.device)
        if self.rank == 0:
            xm.sweep_stale(self.dir)
        self.step = self.resume() if cfg.resume else 0
        if self.rank == 0:
            if not cfg.resume:
                new_run_folder(cfg, self.dir)
            keep_log_until(self.log_path, self.step)  # a resumed run logs the steps after its checkpoint again
            print(f"{self.dir}: {len(self.dataset)} windows, {per_epoch} steps/epoch, schedule {total} steps "
                  f"({self.schedule['warmup']} warm-up), stop at {self.stop}"
                  f"{f', from step {self.step}' if self.step else ''}; global batch {cfg.global_batch} = "
                  f"{self.micro} x {cfg.global_batch // self.micro // world} accum x {world} ranks, {dtype_name} on "
                  f"{self.device}, {xm.count_parameters(self.raw):,} parameters", flush=True)

    def resume(self):
        """Load ckpt.pt (on the CPU; weights_only: it holds tensors and plain containers) and return its step."""
        cfg, path = self.cfg, self.ckpt_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path} to resume: drop --resume to start the run")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path} is not a checkpoint adapt.py wrote ({str(e).splitlines()[0]}): it was not "
                             f"loaded; restore it, or start a new --name") from None
        saved = ckpt["config"]
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
                   if k in RUN_DEFINING and saved.get(k) != v]
        if changed:
            raise ValueError(f"--resume with settings that differ from {path}: {', '.join(changed)}; use the run's "
                             f"settings or a new --name")
        if ckpt["schedule"] != self.schedule:
            raise ValueError(f"{path} was a schedule of {ckpt['schedule']['total']} steps, the corpus now gives "
                             f"{self.schedule['total']}: resume with the cache it was built from, or start a new "
                             f"--name")
        if saved["lr"] != cfg.lr:
            print(f"note: the peak learning rate changes from {saved['lr']:g} to {cfg.lr:g} at step {ckpt['step']}")
        self.raw.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        return ckpt["step"]

    def snapshot(self, step):
        """ckpt.pt's content at `step`, copied to the CPU (training moves on while a thread writes it)."""
        def to_cpu(obj):
            if isinstance(obj, torch.Tensor):
                return obj.detach().to("cpu", copy=True)
            if isinstance(obj, dict):
                return {k: to_cpu(v) for k, v in obj.items()}
            return type(obj)(map(to_cpu, obj)) if isinstance(obj, (list, tuple)) else obj
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        return to_cpu({"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict(), "step": step, "config": asdict(self.cfg),
                       "schedule": self.schedule, "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}})

    def save(self, name):
        """runs/<run>/<name>/: the adapted encoder in the hub layout with its tokenizer files (and crossmodal.pt
        beside the final one)."""
        with xm.atomic_dir(os.path.join(self.dir, name)) as tmp:
            xm.save_hf(self.raw.language, tmp)
            for file in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.isfile(os.path.join(self.lang_dir, file)):
                    shutil.copyfile(os.path.join(self.lang_dir, file), os.path.join(tmp, file))
        if not self.cfg.no_clip and name == "xdbert":
            xm.save_crossmodal(self.raw, os.path.join(self.dir, "crossmodal.pt"))

    def log(self, step, lr, means, grad_norm, dt, clip_real):
        """One log.jsonl record and printed line: LOGGED's means over the steps since the last record, the last
        step's gradient norm, speed, MFU over all positions and over real CLIP tokens."""
        cfg, m, peak = self.cfg, self.raw, device_peak(self.cfg, self.device)
        rates = flop_rates(m, cfg, self.dataset.clip_width, dt, clip_real / cfg.global_batch)
        record = {"step": step, "epoch": step / self.steps_per_epoch, "lr": lr,
                  **{k: v for k, v in zip(LOGGED, means) if k.removesuffix("_acc") in ("loss", *m.tasks)},
                  "grad_norm": grad_norm, "step_s": dt, "tokens_per_s": cfg.global_batch * cfg.seq_len / dt,
                  "mfu": peak and rates[0] / peak}
        mfu = [f"MFU {100 * record['mfu']:.1f}%"] if peak else []
        if peak and m.clip is not None:
            record["mfu_real"] = rates[1] / peak
            mfu = [f"{mfu[0]} ({100 * record['mfu_real']:.1f}% of real tokens)"]
        eta = round(dt * (self.stop - step))
        print(" | ".join([f"step {step}/{self.stop} ({100 * step / self.stop:.0f}%)", f"lr {lr:.2e}",
                          *(f"{k} {record[k]:.4f}" for k in LOGGED if k in record), f"{dt:.2f} s/step",
                          f"{record['tokens_per_s']:,.0f} tok/s", *mfu,
                          f"eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s"]), flush=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def new_run_folder(cfg, run_dir):
    """A new run refuses a folder that holds one already, unless told to replace it."""
    found = [f for f in ("log.jsonl", "ckpt.pt", "xdbert") if os.path.exists(os.path.join(run_dir, f))]
    if found and not cfg.overwrite:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume, start "
                         f"another with --name NEW, or replace it with --overwrite")
    os.makedirs(run_dir, exist_ok=True)


def keep_log_until(path, step):
    """Drop from log.jsonl the records after `step` (a resumed run logs them again) and a torn last line (a kill
    mid-write), with a note."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}:{n} is not a JSON line: repair or delete that line, then --resume") from None
            print(f"note: dropping the torn last line of {path}")
    with xm.atomic_file(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= step)


def load_step(dataset, cfg, step, steps_per_epoch, micro, rank, world, pin):
    """This rank's micro-batches of optimizer step `step` as [(dropout seed, batch)], in pinned memory on CUDA."""
    epoch, within = divmod(step, steps_per_epoch)
    keep = ("input_ids", "token_type_ids", "mlm_positions", "mlm_targets") if cfg.no_clip else None
    out = []
    for m, indices in micro_batches(epoch_order(len(dataset), cfg.seed, epoch), within, cfg.global_batch, micro,
                                    rank, world):
        batch = {k: v.pin_memory() if pin else v for k, v in dataset.batch(indices, cfg.seed, epoch).items()
                 if keep is None or k in keep}
        out.append((cfg.seed + DROPOUT_SEED_STRIDE * (step * (cfg.global_batch // micro) + m + 1), batch))
    return out


def prefetched(load, steps, background):
    """load(s) for s in steps; with background (on CUDA) the next one is built in a thread while the caller trains on
    this one (on a CPU that thread would take a core from the step's own threads: README, "adapt.py")."""
    if not background:
        yield from map(load, steps)
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = [pool.submit(load, s) for s in steps[:1]]
        for s in steps:
            current = ahead.pop()
            if s + 1 < steps.stop:
                ahead.append(pool.submit(load, s + 1))
            yield current.result()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def train_step(model, optimizer, scaler, ctx, micro, clip_grad, device):
    """One optimizer step over this rank's micro-batches [(dropout seed, batch)]: accumulate, all-reduce (DDP syncs
    only on the last micro-batch), unscale, clip, step. Returns the global-batch means of LOGGED (0 for a task that is
    off) and the gradient norm, both left on the device (no host sync)."""
    sums = torch.zeros(len(LOGGED), device=device)
    for i, (seed, batch) in enumerate(micro):
        torch.manual_seed(seed)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with (model.no_sync() if hasattr(model, "no_sync") and i < len(micro) - 1 else nullcontext()), ctx:
            out = model(**batch)
        scaler.scale(out["loss"] / len(micro)).backward()
        sums += torch.stack([out[k].detach().float() if k in out else sums.new_zeros(()) for k in LOGGED])
    if world_size() > 1:
        dist.all_reduce(sums)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums / (len(micro) * world_size()), grad_norm


def first_non_finite(pending, first_step):
    """pending: the (means, grad norm) of the steps since the last check, on the device -> (their means as lists,
    the first step, counted from 1 as the log does, whose loss is not finite, or None)."""
    means = torch.stack([m for m, _ in pending]).tolist()
    bad = next((i for i, m in enumerate(means) if not math.isfinite(m[0])), None)
    return means, None if bad is None else first_step + bad


def train(cfg: AdaptConfig):
    run = Run(cfg)
    model, master = wrap(run.raw, cfg, run.device), run.rank == 0
    load = functools.partial(load_step, run.dataset, cfg, steps_per_epoch=run.steps_per_epoch, micro=run.micro,
                             rank=run.rank, world=world_size(), pin=run.device.type == "cuda")
    pending, clip_real, t_log = [], 0, time.time()
    model.train()
    steps = prefetched(load, range(run.step, run.stop), background=run.device.type == "cuda")
    with ThreadPoolExecutor(1) as writer:  # writes ckpt.pt from a CPU copy while training goes on
        written = writer.submit(lambda: None)
        for step, batches in enumerate(steps, start=run.step + 1):
            lr = cfg.lr * xm.linear_warmup_decay(step - 1, run.schedule["total"], cfg.warmup)  # App. C.1
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            clip_real += sum(int(b["clip_mask"].sum()) for _, b in batches if "clip_mask" in b)
            pending.append(train_step(model, run.optimizer, run.scaler, run.autocast, batches, cfg.clip_grad,
                                      run.device))
            checkpoint = step == run.stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0)
            if not (step % cfg.log_every == 0 or checkpoint or step in run.saves):
                continue
            means, bad = first_non_finite(pending, step - len(pending) + 1)
            if bad is not None:
                raise FloatingPointError(f"the loss is not finite at step {bad}: {run.ckpt_path} holds the last "
                                         f"step with a finite loss; lower --lr and --resume")
            dt, t_log = (time.time() - t_log) / len(pending), time.time()
            if master:
                run.log(step, lr, [sum(c) / len(c) for c in zip(*means)], float(pending[-1][1]), dt,
                        clip_real / len(pending) * world_size())
            pending, clip_real = [], 0
            if master and step in run.saves:
                run.save(run.saves[step])
            if master and checkpoint:
                written.result()
                written = writer.submit(xm.atomic_save, run.snapshot(step), run.ckpt_path)
        written.result()
    if master:
        run.save("xdbert")
        print(f"wrote {run.dir}/xdbert" + ("" if cfg.no_clip else f" and {run.dir}/crossmodal.pt"), flush=True)


def plot(run_dirs, out=None):
    """loss.svg and match_acc.svg in `out` (default the first run's folder): one curve per run from its log.jsonl."""
    logs = {}
    for run in run_dirs:
        path = os.path.join(run, "log.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no log at {path}: give the folders of adapt.py runs (runs/<run>)")
        with open(path, encoding="utf-8") as f:
            logs[os.path.basename(os.path.normpath(run))] = [json.loads(line) for line in f if line.strip()]
    for key, title in (("loss", "adaptation loss (MLM + MATCH + CLIPTC, Sec. 2.3)"), ("match_acc", "MATCH accuracy")):
        series = {run: [(r["epoch"], r[key]) for r in records if key in r] for run, records in logs.items()}
        if any(series.values()):
            path = os.path.join(out or run_dirs[0], f"{key}.svg")
            with xm.atomic_file(path, "w") as f:
                f.write(data.svg_lines({run: s for run, s in series.items() if s}, title, "epoch", key))
            print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["plot"]:
            p = argparse.ArgumentParser(prog="adapt.py plot", description=plot.__doc__)
            p.add_argument("runs", nargs="+")
            p.add_argument("--out", help="folder for the SVGs (default: the first run's)")
            args = p.parse_args(argv[1:])
            return plot(args.runs, args.out)
        train(parse_args(argv))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"adapt.py: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
