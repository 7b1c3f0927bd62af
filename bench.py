"""Benchmarks, each a command that prints measured figures (median over steps, one timer for all):

    python bench.py adapt [--encoder bert-base --clip clip --seq-len 512 --clip-blocks 9 --micro-batch 8 ...]

adapt: optimizer steps of the adaptation model (adapt.train_step) with random weights from model.PRESETS (nothing
downloaded) on random batches of the run's shapes; prints step time, tokens/s, TFLOP/s and MFU (adapt.py's formula).
"""
import argparse
import statistics
import sys
import time

import torch

import adapt
import model as xm


def median_seconds(step, steps, warmup=2, sync=lambda: None):
    """Median wall time of `steps` calls of step() after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_adapt(cfg, steps):
    """Adaptation steps of the real shapes on random weights (single process)."""
    for name in (cfg.encoder,) + (() if cfg.no_clip else (cfg.clip,)):
        if name not in xm.PRESETS:
            raise ValueError(f"the benchmark builds models from model.PRESETS: {name!r} is not one of "
                             f"{', '.join(xm.PRESETS)}")
    rank, world, device = adapt.setup_distributed(cfg)
    raw_model = xm.CrossModalTransformer(xm.PRESETS[cfg.encoder], None if cfg.no_clip else xm.PRESETS[cfg.clip],
                                         cfg.xlayers, cfg.tasks).to(device)
    micro = adapt.micro_batch_size(cfg, world, device)
    optimizer = adapt.make_optimizer(raw_model, cfg, device)
    ctx, scaler, dtype_name = adapt.autocast_setup(cfg.dtype, device)
    model = adapt.wrap(raw_model, cfg, world, device)
    model.train()
    g = torch.Generator().manual_seed(cfg.seed + rank)
    batches = [(cfg.seed + i, adapt.synthetic_batch(raw_model, micro, cfg.seq_len, cfg.clip_blocks, device, g))
               for i in range(cfg.global_batch // micro // world)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dt = median_seconds(lambda: adapt.train_step(model, optimizer, scaler, ctx, batches, world, cfg.clip_grad,
                                                 device), steps, sync=sync)
    flops = adapt.flops_per_sequence(raw_model, cfg.seq_len, cfg.clip_blocks) * cfg.global_batch
    peak = cfg.peak_flops or (adapt.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    what = cfg.encoder if cfg.no_clip else f"{cfg.encoder} + {cfg.clip} x{cfg.xlayers}"
    print(f"adapt {what}, {'+'.join(raw_model.tasks)}, T={cfg.seq_len}, CLIP {cfg.clip_blocks}x77, global batch "
          f"{cfg.global_batch} = {micro} x {len(batches)} x {world}, {dtype_name} on {device}"
          f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}"
          f"{', compiled' if cfg.compile else ''}: median of {steps} steps {dt:.3f} s/step, "
          f"{cfg.global_batch * cfg.seq_len / dt:,.0f} tokens/s, {flops / dt / world / 1e12:.2f} TFLOP/s per device"
          + (f", MFU {100 * flops / dt / world / peak:.1f}%" if peak else ""), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["adapt"])
    p.add_argument("--steps", type=int, default=3)
    args, rest = p.parse_known_args(argv)
    try:
        bench_adapt(adapt.parse_args(rest), args.steps)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"bench.py: {e}") from None


if __name__ == "__main__":
    main()
