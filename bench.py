"""Benchmarks: commands that print measured figures, each a median over timed steps after untimed warm-up ones.

    python bench.py adapt [adapt.py's flags, e.g. --micro-batch 32 --global-batch 32 --compile --dtype bfloat16]
    python bench.py gpu [--out FILE]        # the GPU check that `bash .ci/gpu` runs (toy sizes without CUDA)

adapt: optimizer steps of adapt.train_step with random weights of model.PRESETS (nothing downloaded) on batches
from data.AdaptationData over a synthetic cache (synthetic_cache: realistic CLIP padding, so CLIP-T skips the
blocks a window leaves empty); prints step time, tokens/s, TFLOP/s and MFU over all positions and over real tokens.
gpu: the CUDA tests of test_all.py, the adaptation benchmark (micro-batch 8 and the automatic choice, eager and
compiled) with the minutes one WikiText-103 epoch would take, the graph-break count and the share of a step the GPU
is busy (torch.profiler); a JSON file and a summary table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import torch

import adapt
import data
import model as xm

CLIP_TOKENS_PER_WINDOW = 480  # CLIP BPE tokens per 510 WordPieces of English prose, measured with the real
                              # vocabularies: 427 on Python's documentation, 509 on the paper's own text
EPOCH_WINDOWS = 800 * 300     # App. C.1: about 800 steps of about 300 windows per WikiText-103 epoch


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


def synthetic_cache(folder, windows, seq_len, n_blocks, lang_vocab, clip_vocab, clip_tokens, seed=0):
    """A cache in data.build_cache's layout with random ids: windows of seq_len WordPieces, each with a CLIP text of
    about clip_tokens BPE tokens (normal, 10% spread) packed into n_blocks blocks of 77 as App. B."""
    rng = np.random.default_rng(seed)
    bert = rng.integers(1000, lang_vocab, (windows, seq_len))
    bert[:, 0], bert[:, -1] = 101, 102
    lengths = np.clip(rng.normal(clip_tokens, clip_tokens / 10, windows).astype(int), 1, n_blocks * 75)
    packed = [data._pack_blocks(rng.integers(1, clip_vocab - 2, n), n_blocks, clip_vocab - 2, clip_vocab - 1)
              for n in lengths]
    os.makedirs(folder, exist_ok=True)
    bert.astype(np.uint16).tofile(os.path.join(folder, "bert_ids"))
    np.stack([p[0] for p in packed]).astype(np.uint16).tofile(os.path.join(folder, "clip_ids"))
    np.stack([p[1] for p in packed]).astype(np.uint8).tofile(os.path.join(folder, "clip_lengths"))
    special = data.SpecialIds(cls=101, sep=102, pad=0, mask=103, random_low=1000, vocab_size=lang_vocab,
                              clip_start=clip_vocab - 2, clip_end=clip_vocab - 1)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"key": {"seq_len": seq_len, "n_blocks": n_blocks}, "windows": windows,
                   "special_ids": asdict(special)}, f)
    return data.AdaptationData(folder)


def bench_adapt(cfg, steps, profile=False):
    """Adaptation steps of the run's shapes on random weights (one process); returns the figures as a dict."""
    for name in (cfg.encoder,) + (() if cfg.no_clip else (cfg.clip,)):
        if name not in xm.PRESETS:
            raise ValueError(f"the benchmark builds models from model.PRESETS: {name!r} is not one of "
                             f"{', '.join(xm.PRESETS)}")
    rank, world, device = adapt.setup_distributed(cfg)
    lang, clip = xm.PRESETS[cfg.encoder], None if cfg.no_clip else xm.PRESETS[cfg.clip]
    torch.manual_seed(cfg.seed)
    raw_model = xm.CrossModalTransformer(lang, clip, cfg.xlayers, cfg.tasks).to(device)
    micro = adapt.micro_batch_size(cfg, world, device)
    optimizer = adapt.make_optimizer(raw_model, cfg, device)
    ctx, scaler, dtype_name = adapt.autocast_setup(cfg.dtype, device)
    model = adapt.wrap(raw_model, cfg, device)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = synthetic_cache(tmp, cfg.global_batch * (steps + 3), cfg.seq_len, cfg.clip_blocks, lang.vocab_size,
                                  clip.vocab_size if clip else 49408, CLIP_TOKENS_PER_WINDOW * cfg.seq_len / 512)
        batches = [adapt.load_step(dataset, cfg, s, steps + 3, micro, rank, world, device.type == "cuda")
                   for s in range(steps + 3)]
    real = np.mean([int(b["clip_mask"].sum()) / len(b["clip_mask"]) for s in batches for _, b in s if clip])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    queue = iter(batches)
    step = lambda: adapt.train_step(model, optimizer, scaler, ctx, next(queue), world, cfg.clip_grad, device)
    dt = median_seconds(step, steps, sync=sync)
    peak = cfg.peak_flops or (adapt.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    flops = adapt.flops_per_sequence(raw_model, cfg.seq_len, cfg.clip_blocks) * cfg.global_batch / dt / world
    real_flops = adapt.flops_per_sequence(raw_model, cfg.seq_len, cfg.clip_blocks, real if clip else None) * \
        cfg.global_batch / dt / world
    out = {"model": cfg.encoder if cfg.no_clip else f"{cfg.encoder} + {cfg.clip} x{cfg.xlayers}",
           "seq_len": cfg.seq_len, "clip_blocks": cfg.clip_blocks, "micro_batch": micro,
           "global_batch": cfg.global_batch, "dtype": dtype_name, "compiled": cfg.compile, "device": str(device),
           "step_s": dt, "tokens_per_s": cfg.global_batch * cfg.seq_len / dt, "tflops": flops / 1e12,
           "mfu": flops / peak if peak else None, "mfu_real": real_flops / peak if peak else None,
           "epoch_minutes": EPOCH_WINDOWS / (cfg.global_batch / dt) / 60,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    if profile:
        out |= busy_share(lambda: step(), device) if device.type == "cuda" else {}
    print(f"adapt {out['model']}, T={cfg.seq_len}, CLIP {cfg.clip_blocks}x77, micro-batch {micro}, {dtype_name} on "
          f"{device}{', compiled' if cfg.compile else ''}: {dt:.3f} s/step, {out['tokens_per_s']:,.0f} tokens/s, "
          f"{out['tflops']:.2f} TFLOP/s" + (f", MFU {100 * out['mfu']:.1f}% ({100 * out['mfu_real']:.1f}% of real "
                                             f"tokens)" if peak else ""), flush=True)
    return out


def busy_share(step, device):
    """The share of one step's wall time in which the GPU runs kernels (torch.profiler's CUDA kernel time)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return {"gpu_busy_share": min(1.0, busy / wall)}


def graph_breaks(cfg):
    """torch._dynamo.explain of one adaptation forward + backward: (graphs, graph breaks)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = xm.CrossModalTransformer(xm.PRESETS[cfg.encoder], xm.PRESETS[cfg.clip], cfg.xlayers).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ds = synthetic_cache(tmp, 4, cfg.seq_len, cfg.clip_blocks, m.language.config.vocab_size,
                             m.clip.config.vocab_size, CLIP_TOKENS_PER_WINDOW * cfg.seq_len / 512)
        batch = {k: v.to(device) for k, v in ds.batch(range(4), 0, 0).items()}
    explained = torch._dynamo.explain(lambda b: m(**b)["loss"])(batch)
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count}


def gpu_check(out_path):
    """The GPU check: CUDA tests, adaptation benchmarks, graph breaks; toy sizes on a machine without CUDA."""
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA: toy sizes, to show the check runs)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "test_all.py", "-k", "cuda"], capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    report["cuda_tests"] = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]
    base = adapt.parse_args([] if cuda else ["--toy", "--global-batch", "16"])
    runs = [replace(base, micro_batch=8, global_batch=8)] + [replace(base, micro_batch=None, compile=c)
                                                              for c in (False, True)]
    report["adapt"] = []
    for cfg in runs:
        cfg = replace(cfg, global_batch=cfg.micro_batch or adapt.micro_batch_size(
            cfg, 1, torch.device("cuda" if cuda else "cpu")))
        report["adapt"].append(bench_adapt(cfg, steps=5, profile=True))
        torch.cuda.empty_cache() if cuda else None
    report |= graph_breaks(base)
    with xm.atomic_file(out_path, "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['device']}, torch {report['torch']}, {report['date']}; CUDA tests: {report['cuda_tests']}")
    print("| micro-batch | compiled | s/step | tokens/s | MFU | MFU real tokens | epoch min | peak GB | GPU busy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["adapt"]:
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
        print(f"| {r['micro_batch']} | {r['compiled']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{pct(r['mfu'])} | {pct(r['mfu_real'])} | {r['epoch_minutes']:.1f} | "
              f"{r['peak_memory_gb'] or 0:.1f} | {pct(r.get('gpu_busy_share'))} |")
    print(f"graphs {report['graphs']}, graph breaks {report['graph_breaks']}; written {out_path}")


# ----------------------------------------------------------------------------- model.py against transformers

def bench_model(steps, memory_of=None):
    """Forward+backward of our BERT-base (8 x 128) and CLIP-T (72 x 77) against transformers' sdpa implementations
    on identical weights and inputs: median time, and the resident memory one step adds at its peak, each measured in
    a fresh process (memory_of=(preset, shape, impl)) whose Linux peak counter (VmHWM) is reset after a warm-up step."""
    try:
        import transformers
    except ImportError:
        raise ValueError("the model benchmark compares against transformers: "
                         "`pip install -r requirements-test.txt` first") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def step_of(preset, shape, impl):  # one forward+backward of `impl` on a fixed random batch
        torch.manual_seed(0)
        cfg = xm.PRESETS[preset]
        net = xm.CLIPTextTransformer(cfg) if preset == "clip" else xm.LanguageEncoder(cfg)
        if impl == "transformers":  # output 0: CLIP's pooled projection, BERT's last hidden state
            with tempfile.TemporaryDirectory() as d:
                xm.save_hf(net, d)
                hf = transformers.CLIPTextModelWithProjection if preset == "clip" else transformers.BertModel
                net = hf.from_pretrained(d, attn_implementation="sdpa")
        ids = torch.randint(0, cfg.vocab_size - 1, shape)
        net.train()
        return lambda: net(ids)[0].float().square().mean().backward()

    def status_mb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    if memory_of:
        step = step_of(*memory_of)
        step()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = status_mb("VmRSS")
        step()
        print(status_mb("VmHWM") - base)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {steps} steps")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # glibc's malloc returns freed memory at once
    for preset, shape in (("bert-base", (8, 128)), ("clip", (72, 77))):
        t, mem = {}, {}
        for impl in ("ours", "transformers"):
            t[impl] = median_seconds(step_of(preset, shape, impl), steps)
            code = f"import bench; bench.bench_model(0, {(preset, shape, impl)!r})"
            mem[impl] = float(subprocess.check_output([sys.executable, "-c", code], env=env,
                                                      cwd=os.path.dirname(os.path.abspath(__file__))))
        print(f"{preset:9s} {shape[0]:2d} x {shape[1]:3d}: fwd+bwd ours {t['ours'] * 1e3:6.0f} ms, transformers "
              f"{t['transformers'] * 1e3:6.0f} ms, ratio {t['ours'] / t['transformers']:.2f} | peak step memory "
              f"ours {mem['ours']:5.0f} MB, transformers {mem['transformers']:5.0f} MB, "
              f"ratio {mem['ours'] / mem['transformers']:.2f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["adapt", "gpu", "model"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="gpu: the JSON file (default $OUT/gpu_check.json)")
    args, rest = p.parse_known_args(argv)
    try:
        if args.what == "gpu":
            gpu_check(args.out or os.path.join(os.environ.get("OUT") or tempfile.mkdtemp(), "gpu_check.json"))
        elif args.what == "model":
            bench_model(args.steps)
        else:
            bench_adapt(adapt.parse_args(rest), args.steps)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"bench.py: {e}") from None


if __name__ == "__main__":
    main()
