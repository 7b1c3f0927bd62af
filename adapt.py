"""Sec. 2.3 + App. C.1: cross-modal adaptation of BERT/ELECTRA with CLIP's text transformer (XDBERT).

    python adapt.py --toy                                         # the quick start: the toy kit, 89 steps on a CPU
    torchrun --nproc_per_node 8 adapt.py --encoder bert-base      # the paper's run: one epoch of WikiText-103
    python adapt.py --encoder electra-large --tasks mlm,match     # Table 3 ablations: --tasks, --xlayers, --epochs
    python adapt.py --encoder bert-base --no-clip                 # Sec. 3 fair baseline: one more epoch of plain MLM
    python adapt.py --encoder bert-base --benchmark 20            # speed on synthetic batches of the real shapes
    python adapt.py --encoder bert-base --name NAME --resume      # continue runs/NAME/ckpt.pt

The model (model.CrossModalTransformer) is trained on the WikiText-103 cache of data.py with the plain sum of the
MLM, MATCH and CLIPTC cross-entropies (Sec. 2.3), AdamW at 1e-4, 5% warm-up then linear decay, gradient clipping
1.0, one epoch of windows of 512 BERT tokens and 9 x 77 CLIP tokens (App. B, C.1). The global batch of about 300
sequences (Spec 6: ~800 optimizer steps per epoch) is split as
    global batch = per-device batch (--batch-size) x gradient accumulation x world size.
Outputs, in runs/<run>/: xdbert/ (the adapted language encoder in the hub layout, for finetune.py --encoder),
crossmodal.pt (the whole model, for finetune.py --full-model), ckpt.pt (the resumable state), log.jsonl.

Distributed: torchrun's RANK / LOCAL_RANK / WORLD_SIZE select DDP (nccl on GPU, gloo on CPU); without them this is
one process. The examples of optimizer step s are the slice [s*G, (s+1)*G) of a permutation drawn from
(--seed, epoch); its G/B micro-batches go round-robin over the ranks, and dropout is seeded from (--seed, micro-batch),
so a run gives the same weights (to float rounding) on any world size, and a run killed and resumed from ckpt.pt
gives bitwise the same weights as one never interrupted (on CPU).

MFU (model FLOPs utilisation, as in nanoGPT / PaLM App. B): the FLOPs of one training sequence are
    6 x (matmul parameters x the tokens they act on)   forward + backward of every weight matrix
  + 12 x layers x width x seq x seq                     the attention scores and mixing, per stream
summed over the language encoder (T = 512 tokens), CLIP-T (n = 9 blocks of 77, attention within a block), the
cross-modal layers (T language + 9 x 77 CLIP tokens; self-attention T x T and 693 x 693, cross-attention T x 693
both ways) and the heads (the MLM and CLIPTC decoders on the 15% of positions they predict); a stream of the last
cross-modal layer that no chosen task reads counts its forward only. flops_per_sequence implements it (the tests
check it against torch's FlopCounterMode). The peak is the dense bf16 tensor-core figure of the device (PEAK_FLOPS,
or --peak-flops); on a CPU MFU is printed only with --peak-flops.
"""
import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import model as xm

# Dense bf16 tensor-core peak per device, FLOP/s (vendor data sheets; SXM parts)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "A10": 125e12,
              "L4": 121e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12}
TASK_NAMES = ("mlm", "match", "cliptc")
# Defaults of the flags left unset: the toy kit's random tiny encoders need a larger learning rate to move in 89 steps
TOY = {"data": "data/toy", "encoder": "bert-toy", "clip": "clip-toy", "seq_len": 128, "clip_blocks": 2,
       "global_batch": 16, "batch_size": 16, "lr": 3e-3}
FULL = {"data": "data", "encoder": "bert-base", "clip": "clip", "seq_len": 512, "clip_blocks": 9,
        "global_batch": 320, "batch_size": 8, "lr": 1e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="the toy kit: data/toy, bert-toy + clip-toy, short windows")
    p.add_argument("--data", help="data root (default data, or data/toy with --toy)")
    p.add_argument("--encoder", help="a name under DATA/ckpt/ or a hub-layout dir (default bert-base)")
    p.add_argument("--clip", help="CLIP text tower: a name under DATA/ckpt/ or a dir (default clip)")
    p.add_argument("--corpus", help="raw text corpus (default DATA/wikitext-103-raw/wiki.train.raw)")
    p.add_argument("--cache", help="an existing cache dir built by data.build_cache (default: build or reuse one)")
    p.add_argument("--tasks", default="mlm,match,cliptc", help="Table 3: any subset of mlm,match,cliptc")
    p.add_argument("--xlayers", type=int, default=2, help="cross-modal layers (App. B: 2; Table 3: 1)")
    p.add_argument("--no-clip", action="store_true", help="Sec. 3 fair baseline: the language encoder alone, plain MLM")
    p.add_argument("--epochs", type=float, default=1.0, help="App. C.1: 1 (Table 3: 2, 20)")
    p.add_argument("--seq-len", type=int, help="BERT window (App. B: 512)")
    p.add_argument("--clip-blocks", type=int, help="CLIP blocks of 77 per window (App. B: 9)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (default 320; Spec 6: about 300)")
    p.add_argument("--batch-size", type=int, help="sequences per device per micro-step (default 8)")
    p.add_argument("--grad-accum", type=int,
                   help="micro-steps per optimizer step; sets the global batch to batch-size x grad-accum x world size")
    p.add_argument("--lr", type=float, help="peak learning rate (App. C.1: 1e-4; --toy: 3e-3)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (App. C.1: 0.05)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of the matrices (not biases, norms)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (the authors' code: 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype: auto = bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", help="cuda or cpu (default cuda when available)")
    p.add_argument("--name", help="writes <out>/<name>/ (default <encoder>-<tasks>, or toy)")
    p.add_argument("--out", default="runs", help="runs root")
    p.add_argument("--resume", action="store_true", help="continue from runs/<run>/ckpt.pt")
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (0: at the end only)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule is unchanged)")
    p.add_argument("--benchmark", type=int, metavar="N", help="time N steps on random batches of the real shapes")
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: PEAK_FLOPS by device name)")
    args = p.parse_args(argv)
    for key, value in (TOY if args.toy else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    chosen = args.tasks.split(",")
    args.tasks = tuple(t for t in TASK_NAMES if t in chosen)
    unknown = set(chosen) - set(TASK_NAMES)
    if unknown or not args.tasks:
        p.error(f"--tasks {','.join(sorted(unknown)) or '(empty)'}: choose a subset of {','.join(TASK_NAMES)}")
    if args.no_clip:
        args.tasks = ("mlm",)
    return args

# ----------------------------------------------------------------------------- distributed set-up


def setup_distributed(device_arg):
    """torchrun's env vars -> (rank, local_rank, world, device); one process when they are absent."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device_type = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def split_batch(args, world):
    """global batch = batch-size x grad-accum x world; returns grad-accum (micro-steps per rank per step)."""
    if args.grad_accum is not None:
        args.global_batch = args.batch_size * args.grad_accum * world
    if args.global_batch % world:
        raise SystemExit(f"global batch {args.global_batch} is not divisible by the world size {world}: "
                         f"pass --global-batch as a multiple of {world}")
    per_rank = args.global_batch // world
    if per_rank % args.batch_size:
        raise SystemExit(f"the {per_rank} sequences per device of global batch {args.global_batch} do not split into "
                         f"micro-batches of --batch-size {args.batch_size}: pass a --batch-size dividing {per_rank}")
    return per_rank // args.batch_size


def autocast_setup(dtype_arg, device):
    """Returns (autocast context, GradScaler, dtype name): bf16 on CUDA where supported, else fp16 + scaler."""
    if dtype_arg == "auto":
        if device.type == "cuda":
            dtype_arg = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype_arg = "float32"
    dtype = getattr(torch, dtype_arg)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return ctx, scaler, dtype_arg

# ----------------------------------------------------------------------------- schedule, order, FLOPs


def lr_at(step, total, warmup, peak):
    """App. C.1: linear warm-up over `warmup` steps then linear decay to 0 at `total` (as transformers'
    get_linear_schedule_with_warmup, which the authors' Trainer used)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


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


def peak_flops(device, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None

# ----------------------------------------------------------------------------- the run


def build_model(args, lang_dir, clip_dir):
    """The cross-modal transformer from the public checkpoints; --no-clip: the language encoder with its MLM head
    alone (model.py's baseline: no CLIP-T, no cross-modal layers)."""
    if args.no_clip:
        return xm.load_crossmodal_from_hf(lang_dir, None, xlayers=0, tasks=("mlm",))
    return xm.load_crossmodal_from_hf(lang_dir, clip_dir, xlayers=args.xlayers, tasks=args.tasks)


def prepare_data(args, rank, world, lang_dir, clip_dir):
    """data.build_cache on rank 0 (the others wait on a barrier and then reuse it) -> data.AdaptationData."""
    if args.cache:
        if not os.path.isdir(args.cache):
            raise SystemExit(f"no cache at {args.cache}: drop --cache to build one from --corpus")
        return data.AdaptationData(args.cache)
    corpus = args.corpus or os.path.join(args.data, "wikitext-103-raw", "wiki.train.raw")
    if not os.path.isfile(corpus):
        hint = "python download.py --toy" if args.toy else "python download.py wikitext"
        raise SystemExit(f"no corpus at {corpus}: run `{hint}` or pass --corpus FILE")
    def cache(log):
        return data.build_cache(corpus, lang_dir, clip_dir, os.path.join(args.data, "cache"), seq_len=args.seq_len,
                                n_blocks=args.clip_blocks, log=log)
    if rank == 0:
        built = cache(print)
    if world > 1:
        dist.barrier()
    return data.AdaptationData(built if rank == 0 else cache(lambda _: None))


def run_config(args):
    """The flags a resumed run must share with the run it continues."""
    keys = ("encoder", "clip", "corpus", "cache", "tasks", "xlayers", "no_clip", "epochs", "seq_len", "clip_blocks",
            "global_batch", "lr", "warmup", "weight_decay", "clip_grad", "seed", "max_steps")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k in keys}


def save_outputs(raw_model, args, run_dir, lang_dir):
    """runs/<run>/xdbert/ (hub layout + the encoder's tokenizer files) and runs/<run>/crossmodal.pt."""
    out, tmp = os.path.join(run_dir, "xdbert"), os.path.join(run_dir, "xdbert.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    xm.save_hf(raw_model.language, tmp)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(lang_dir, name)):
            shutil.copyfile(os.path.join(lang_dir, name), os.path.join(tmp, name))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if not args.no_clip:
        xm.save_crossmodal(raw_model, os.path.join(run_dir, "crossmodal.pt"))


def unread_streams(m):
    """(language, CLIP) flags: is that stream of the last cross-modal layer read by no chosen task? The language
    stream feeds MLM and MATCH, the CLIP stream CLIPTC; an unread stream's last sublayers get no gradient."""
    if not len(m.xlayers):
        return False, False
    return not {"mlm", "match"} & set(m.tasks), "cliptc" not in m.tasks


def flops_per_sequence(m, seq_len, clip_blocks):
    """Training FLOPs of one sequence by the formula of the module docstring, counted as multiply-accumulates (MACs):
    a weight matrix costs its size per token it acts on, an attention 2 x width x query tokens x key tokens (scores
    and mixing); forward + backward = 6 FLOPs per MAC, or 2 (forward only) for the last cross-modal layer's stream
    that no chosen task reads (e.g. the CLIP stream without CLIPTC)."""
    lc = m.language.config
    T, H, E, F = seq_len, lc.hidden_size, lc.embedding_size or lc.hidden_size, lc.ffn_size
    train_macs = T * (lc.num_layers * (4 * H * H + 2 * H * F) + (E * H if E != H else 0))  # + ELECTRA-small projection
    train_macs += lc.num_layers * 2 * H * T * T
    forward_macs = 0
    if "mlm" in m.tasks:                   # the MLM head runs on the 15% masked tokens only (model.token_loss)
        train_macs += 0.15 * T * (H * E + E * lc.vocab_size)
    if m.clip is not None:
        cc, C = m.clip.config, m.clip.config.context_length
        W, P, V = cc.width, cc.projection_dim, clip_blocks * C
        train_macs += V * (cc.num_layers * (4 * W * W + 2 * W * cc.ffn_size) + W * P)
        train_macs += clip_blocks * cc.num_layers * 2 * W * C * C            # CLIP-T attends within each block of 77
        lang_unread, vis_unread = unread_streams(m)
        for i in range(len(m.xlayers)):   # per stream: cross-attention (Q, out on its tokens; K, V on the other's)
            lang = T * (2 * H * H + 4 * H * H + 2 * H * F) + V * 2 * P * H + 2 * H * T * V + 2 * H * T * T
            vis = V * (2 * P * P + 4 * P * P + 2 * P * F) + T * 2 * H * P + 2 * P * V * T + 2 * P * V * V
            last = i == len(m.xlayers) - 1
            dead = lang * (last and lang_unread) + vis * (last and vis_unread)
            train_macs, forward_macs = train_macs + lang + vis - dead, forward_macs + dead
        if "cliptc" in m.tasks:            # CLIPTC on 15% of the CLIP positions (counted over padding too)
            train_macs += 0.15 * V * (P * W + W * cc.vocab_size)
    return 6 * train_macs + 2 * forward_macs


def train_step(model, optimizer, scaler, ctx, micro, world, clip_grad, step):
    """One optimizer step over this rank's micro-batches [(dropout seed, batch)]: accumulate, all-reduce (DDP syncs
    only on the last micro-batch), unscale, clip, step. Returns the global-batch mean of
    [loss, mlm, match, cliptc, match_acc] (0 for a task that is off) and the gradient norm."""
    sums = None
    for i, (seed, batch) in enumerate(micro):
        torch.manual_seed(seed)
        with (model.no_sync() if world > 1 and i < len(micro) - 1 else nullcontext()), ctx:
            out = model(**batch)
        scaler.scale(out["loss"] / len(micro)).backward()
        parts = torch.stack([out[k].detach().float() if k in out else torch.zeros((), device=out["loss"].device)
                             for k in ("loss", "mlm", "match", "cliptc", "match_acc")])
        sums = parts if sums is None else sums + parts
    if world > 1:
        dist.all_reduce(sums)
    means = (sums / (len(micro) * world)).tolist()
    if not math.isfinite(means[0]):
        raise SystemExit(f"the loss is {means[0]} at step {step} (mlm {means[1]}, match {means[2]}, cliptc "
                         f"{means[3]}): lower --lr or use --dtype bfloat16/float32, then --resume from ckpt.pt")
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                      clip_grad))
    if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16 overflow: the scaler skips the step
        raise SystemExit(f"the gradient norm is {grad_norm} at step {step}: lower --lr, then --resume from ckpt.pt")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return means, grad_norm


def make_optimizer(raw_model, args, device):
    """AdamW, weight decay on the matrices only (not biases, LayerNorms); fused on CUDA."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def wrap(raw_model, args, world, local_rank, device):
    """torch.compile, then DDP; an ablation that leaves a stream of the last cross-modal layer unread (e.g. the CLIP
    stream without CLIPTC) has parameters without gradients, which DDP must be told to look for."""
    model = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                    find_unused_parameters=any(unread_streams(raw_model)))
    return model


def main(argv=None):
    args = parse_args(argv)
    grad_accum = split_batch(args, int(os.environ.get("WORLD_SIZE", 1)))   # before any process group exists
    rank, local_rank, world, device = setup_distributed(args.device)
    ctx, scaler, dtype_name = autocast_setup(args.dtype, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)                       # the same fresh heads on every rank
    if args.benchmark:
        benchmark(args, rank, local_rank, world, device, ctx, scaler, dtype_name, grad_accum)
    else:
        train(args, rank, local_rank, world, device, ctx, scaler, dtype_name, grad_accum)
    if world > 1:
        dist.destroy_process_group()


def train(args, rank, local_rank, world, device, ctx, scaler, dtype_name, grad_accum):
    master = rank == 0
    try:
        lang_dir, clip_dir = data.checkpoint_dir(args.encoder, args.data), data.checkpoint_dir(args.clip, args.data)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    dataset = prepare_data(args, rank, world, lang_dir, clip_dir)
    steps_per_epoch = len(dataset) // args.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"the corpus gives {len(dataset)} windows, fewer than one global batch of "
                         f"{args.global_batch}: pass a smaller --global-batch or a larger --corpus")
    total = max(1, round(args.epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup * total)
    last = min(total, args.max_steps or total)
    run = args.name or ("toy" if args.toy else os.path.basename(os.path.normpath(args.encoder)) + "-"
                        + ("noclip" if args.no_clip else "+".join(args.tasks)))
    run_dir = os.path.join(args.out, run)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")

    raw_model = build_model(args, lang_dir, clip_dir).to(device)
    optimizer = make_optimizer(raw_model, args, device)
    step = 0
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"no checkpoint at {ckpt_path} to resume: drop --resume to start the run")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        changed = [f"{k} {ckpt['config'].get(k)!r} -> {v!r}" for k, v in run_config(args).items()
                   if ckpt["config"].get(k) != v]
        if changed:
            raise SystemExit(f"--resume with flags that differ from {ckpt_path}: {', '.join(changed)}; "
                             f"use the run's flags or a new --name")
        if ckpt["schedule"] != {"total": total, "warmup": warmup}:
            raise SystemExit(f"{ckpt_path} was a run of {ckpt['schedule']['total']} steps, the corpus now gives "
                             f"{total}: resume with the cache it was built from, or start a new --name")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        step = ckpt["step"]
    if master:
        os.makedirs(run_dir, exist_ok=True)
        keep_log_until(os.path.join(run_dir, "log.jsonl"), step)
        print(f"{run}: {len(dataset)} windows, {steps_per_epoch} steps/epoch, {total} steps ({warmup} warm-up)"
              f"{f', from step {step}' if step else ''}, global batch {args.global_batch} = {args.batch_size} x "
              f"{grad_accum} accum x {world} ranks, {dtype_name} on {device}, "
              f"{xm.count_parameters(raw_model):,} parameters", flush=True)
    model = wrap(raw_model, args, world, local_rank, device)
    flops_seq = flops_per_sequence(raw_model, args.seq_len, args.clip_blocks)
    peak = peak_flops(device, args.peak_flops)
    keep = None if not args.no_clip else ("input_ids", "token_type_ids", "mlm_positions", "mlm_targets")
    n_micro = args.global_batch // args.batch_size

    def save_checkpoint():
        if master:
            xm.atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(), "step": step, "config": run_config(args),
                            "schedule": {"total": total, "warmup": warmup},
                            "rng": {"cpu": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}},
                           ckpt_path)

    model.train()
    t_log, step_at_log = time.time(), step
    while step < last:
        epoch, within = divmod(step, steps_per_epoch)
        lr = lr_at(step, total, warmup, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = epoch_order(len(dataset), args.seed, epoch)
        micro = []
        for m, indices in micro_batches(order, within, args.global_batch, args.batch_size, rank, world):
            batch = dataset.batch(indices, args.seed, epoch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if keep is None or k in keep}
            micro.append((args.seed + 1_000_003 * (step * n_micro + m + 1), batch))   # dropout seed per micro-batch
        means, grad_norm = train_step(model, optimizer, scaler, ctx, micro, world, args.clip_grad, step)
        step += 1
        if master and (step % args.log_every == 0 or step == last):
            now = time.time()
            dt = (now - t_log) / (step - step_at_log)
            t_log, step_at_log = now, step
            record = {"step": step, "epoch": epoch + (within + 1) / steps_per_epoch, "lr": lr,
                      **{k: means[j] for j, k in enumerate(("loss", "mlm", "match", "cliptc", "match_acc"))
                         if k == "loss" or k in raw_model.tasks or (k == "match_acc" and "match" in raw_model.tasks)},
                      "grad_norm": grad_norm, "step_s": dt, "tokens_per_s": args.global_batch * args.seq_len / dt,
                      "mfu": flops_seq * args.global_batch / dt / world / peak if peak else None}
            log(run_dir, record, last, dt * (last - step))
        if args.ckpt_every and step % args.ckpt_every == 0 and step < last:
            save_checkpoint()
    save_checkpoint()
    if master:
        save_outputs(raw_model, args, run_dir, lang_dir)
        print(f"wrote {run_dir}/xdbert" + ("" if args.no_clip else f" and {run_dir}/crossmodal.pt"), flush=True)


def synthetic_batch(raw_model, batch_size, seq_len, clip_blocks, device, g):
    """Random token ids in the real shapes, without padding: BERT (B, T) with 15% of the positions as MLM targets,
    CLIP (B, n, 77) framed by <|startoftext|> ... <|endoftext|> (the two largest ids) with 15% as CLIPTC targets,
    random MATCH labels."""
    def targets(ids):  # (B, L) -> positions, targets (B, round(0.15 L)) at distinct random positions
        positions = torch.rand(ids.shape, generator=g).argsort(1)[:, :round(0.15 * ids.shape[1])].sort(1).values
        return positions, ids.gather(1, positions)
    V = raw_model.language.config.vocab_size
    ids = torch.randint(0, V, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
             **dict(zip(("mlm_positions", "mlm_targets"), targets(ids)))}
    if raw_model.clip is not None:
        cv, C = raw_model.clip.config.vocab_size, raw_model.clip.config.context_length
        clip = torch.randint(1, cv - 2, (batch_size, clip_blocks, C), generator=g)
        clip[..., 0], clip[..., -1] = cv - 2, cv - 1
        batch |= {"clip_ids": clip, "clip_mask": torch.ones_like(clip),
                  "match_labels": torch.randint(0, 2, (batch_size,), generator=g),
                  **dict(zip(("cliptc_positions", "cliptc_targets"), targets(clip.flatten(1))))}
    return {k: v.to(device) for k, v in batch.items()}


def benchmark(args, rank, local_rank, world, device, ctx, scaler, dtype_name, grad_accum):
    """--benchmark N: N optimizer steps (after 2 untimed) on random batches of the run's shapes, random weights
    from model.PRESETS (no download needed). Prints tokens/s, step time and MFU."""
    for name in (args.encoder,) + (() if args.no_clip else (args.clip,)):
        if name not in xm.PRESETS:
            raise SystemExit(f"--benchmark builds models from model.PRESETS: {name!r} is not one of "
                             f"{', '.join(xm.PRESETS)}")
    clip_cfg = None if args.no_clip else xm.PRESETS[args.clip]
    raw_model = xm.CrossModalTransformer(xm.PRESETS[args.encoder], clip_cfg, 0 if args.no_clip else args.xlayers,
                                         args.tasks).to(device)
    optimizer = make_optimizer(raw_model, args, device)
    model = wrap(raw_model, args, world, local_rank, device)
    model.train()
    g = torch.Generator().manual_seed(args.seed + rank)
    micro = [(args.seed + i, synthetic_batch(raw_model, args.batch_size, args.seq_len, args.clip_blocks, device, g))
             for i in range(grad_accum)]
    times = []
    for i in range(args.benchmark + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, optimizer, scaler, ctx, micro, world, args.clip_grad, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = sorted(times[2:])[len(times[2:]) // 2]
    flops = flops_per_sequence(raw_model, args.seq_len, args.clip_blocks) * args.global_batch
    peak = peak_flops(device, args.peak_flops)
    if rank == 0:
        what = args.encoder if args.no_clip else f"{args.encoder} + {args.clip} x{args.xlayers}"
        print(f"benchmark {what}, {'+'.join(raw_model.tasks)}, T={args.seq_len}, CLIP {args.clip_blocks}x77, "
              f"global batch {args.global_batch} = {args.batch_size} x {grad_accum} x {world}, {dtype_name} on "
              f"{device}{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}"
              f"{', compiled' if args.compile else ''}: median of {args.benchmark} steps {dt:.3f} s/step, "
              f"{args.global_batch * args.seq_len / dt:,.0f} tokens/s, {flops / dt / world / 1e12:.2f} TFLOP/s "
              f"per device" + (f", MFU {100 * flops / dt / world / peak:.1f}%" if peak else ""), flush=True)


def keep_log_until(path, step):
    """A resumed run logs again the steps after its checkpoint: drop them from log.jsonl first."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with xm.atomic_file(path, "w") as f:
        f.writelines(lines)


def log(run_dir, record, last, eta):
    parts = [f"step {record['step']}/{last} ({100 * record['step'] / last:.0f}%)", f"lr {record['lr']:.2e}",
             *(f"{k} {record[k]:.4f}" for k in ("loss", "mlm", "match", "cliptc", "match_acc") if k in record),
             f"{record['step_s']:.2f} s/step", f"{record['tokens_per_s']:,.0f} tok/s"]
    if record["mfu"] is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    eta = round(eta)
    parts.append(f"eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s")
    print(" | ".join(parts), flush=True)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
