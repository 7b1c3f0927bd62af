"""Benchmarks: each prints measured figures, a median over timed steps after untimed warm-up ones (README, "Measured
figures"): `python bench.py adapt [adapt.py's flags]`, `cache --mb 50`, `finetune`, `model`, and `gpu`, the check
that `bash .ci/gpu` runs (toy sizes without CUDA). Models have random weights (model.PRESETS): nothing downloaded."""
import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

import adapt
import data
import finetune
import model as xm

CLIP_TOKENS_PER_WINDOW = 480  # CLIP BPE tokens per 510 WordPieces of English prose, measured with the real
                              # vocabularies: 427 on Python's documentation, 509 on the paper's own text
EPOCH_WINDOWS = 800 * 300     # App. C.1: about 800 steps of about 300 windows per WikiText-103 epoch
RTE_TRAIN, RTE_DEV = 2490, 277  # GLUE RTE's train and dev examples
WIKITEXT_TRAIN_MB = 546.5  # WikiText-103's raw train split (Merity et al. 2017)


def median_seconds(step, steps, warmup=2, device="cpu"):
    """Median wall time of `steps` calls of step() after `warmup` untimed ones (waiting for a CUDA device's work)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_batch(raw_model, batch_size, seq_len, clip_blocks, device, g):
    """Random token ids in the real shapes, without padding: BERT (B, T) and CLIP (B, n, 77) framed by
    <|startoftext|> ... <|endoftext|> (the two largest ids), the MLM and CLIPTC prediction slots of data.py at random
    positions, random MATCH labels (for tests and the FLOP count)."""
    slots = (seq_len - 2, clip_blocks * data.CLIP_BLOCK_TOKENS)
    mlm, cliptc = (data.prediction_slots(n, data.MASK_PROB) for n in slots)
    def targets(ids, slots):  # (B, L) -> positions, targets (B, slots) at distinct random positions
        positions = torch.rand(ids.shape, generator=g).argsort(1)[:, :slots].sort(1).values
        return positions, ids.gather(1, positions)
    ids = torch.randint(0, raw_model.language.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
             **dict(zip(("mlm_positions", "mlm_targets"), targets(ids, mlm)))}
    if raw_model.clip is not None:
        cv, C = raw_model.clip.config.vocab_size, raw_model.clip.config.context_length
        clip = torch.randint(1, cv - 2, (batch_size, clip_blocks, C), generator=g)
        clip[..., 0], clip[..., -1] = cv - 2, cv - 1
        batch |= {"clip_ids": clip, "clip_mask": torch.ones_like(clip),
                  "match_labels": torch.randint(0, 2, (batch_size,), generator=g),
                  **dict(zip(("cliptc_positions", "cliptc_targets"), targets(clip.flatten(1), cliptc)))}
    return {k: v.to(device) for k, v in batch.items()}


def synthetic_model(cfg, device, folder, windows, seed=0):
    """The run's model with random weights of model.PRESETS, and a cache in data.build_cache's layout in `folder`
    with random ids: `windows` windows, each with a CLIP text of about CLIP_TOKENS_PER_WINDOW BPE tokens per 512
    WordPieces (normal, 10% spread) packed into blocks of 77 (App. B)."""
    for name in (cfg.encoder,) + (() if cfg.no_clip else (cfg.clip,)):
        if name not in xm.PRESETS:
            raise ValueError(f"the benchmark builds models from model.PRESETS: {name!r} is not one of "
                             f"{', '.join(xm.PRESETS)}")
    lang, clip = xm.PRESETS[cfg.encoder], None if cfg.no_clip else xm.PRESETS[cfg.clip]
    torch.manual_seed(cfg.seed)
    m = xm.CrossModalTransformer(lang, clip, cfg.xlayers, cfg.tasks).to(device)
    seq_len, n_blocks, lang_vocab = cfg.seq_len, cfg.clip_blocks, lang.vocab_size
    clip_vocab = clip.vocab_size if clip else 49408  # CLIP's (a run without CLIP-T does not read these ids)
    rng, clip_tokens = np.random.default_rng(seed), CLIP_TOKENS_PER_WINDOW * seq_len / 512
    bert = rng.integers(1000, lang_vocab, (windows, seq_len))
    bert[:, 0], bert[:, -1] = 101, 102
    lengths = np.clip(rng.normal(clip_tokens, clip_tokens / 10, windows).astype(int), 1, n_blocks * 75)
    packed = [data._pack_blocks(rng.integers(1, clip_vocab - 2, n), n_blocks, clip_vocab - 2, clip_vocab - 1)
              for n in lengths]
    bert.astype(np.uint16).tofile(os.path.join(folder, "bert_ids"))
    np.stack([p[0] for p in packed]).astype(np.uint16).tofile(os.path.join(folder, "clip_ids"))
    np.stack([p[1] for p in packed]).astype(np.uint8).tofile(os.path.join(folder, "clip_lengths"))
    special = data.SpecialIds(cls=101, sep=102, pad=0, mask=103, random_low=1000, vocab_size=lang_vocab,
                              clip_start=clip_vocab - 2, clip_end=clip_vocab - 1)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"key": {"seq_len": seq_len, "n_blocks": n_blocks}, "windows": windows,
                   "special_ids": special._asdict()}, f)
    return m, data.AdaptationData(folder)


def bench_adapt(cfg, steps, profile=False):
    """Adaptation steps of the run's shapes on random weights (one process); returns the figures as a dict."""
    rank, world, device = adapt.setup_distributed(cfg)
    micro = adapt.micro_batch_size(cfg, world, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # each configuration's own peak, not the highest so far
    with tempfile.TemporaryDirectory() as tmp:
        raw_model, dataset = synthetic_model(cfg, device, tmp, cfg.global_batch * (steps + 3))
        batches = [adapt.load_step(dataset, cfg, s, steps + 3, micro, rank, world, device.type == "cuda")
                   for s in range(steps + 3)]
    optimizer = adapt.make_optimizer(raw_model, cfg, device)
    ctx, scaler, dtype_name = adapt.autocast_setup(cfg.dtype, device)
    model = adapt.wrap(raw_model, cfg, device).train()
    clip = raw_model.clip is not None
    real = np.mean([int(b["clip_mask"].sum()) / len(b["clip_mask"]) for s in batches for _, b in s]) if clip else None
    queue = iter(batches)
    step = lambda: adapt.train_step(model, optimizer, scaler, ctx, next(queue), cfg.clip_grad, device)
    dt = median_seconds(step, steps, device=device)
    peak, width = adapt.device_peak(cfg, device), dataset.clip_width
    flops, real_flops = adapt.flop_rates(raw_model, cfg, width, dt, real)
    out = {"model": cfg.encoder if cfg.no_clip else f"{cfg.encoder} + {cfg.clip} x{cfg.xlayers}",
           "seq_len": cfg.seq_len, "clip_blocks": cfg.clip_blocks, "micro_batch": micro,
           "global_batch": cfg.global_batch, "dtype": dtype_name, "compiled": cfg.compile, "device": str(device),
           "step_s": dt, "tokens_per_s": cfg.global_batch * cfg.seq_len / dt, "tflops": flops / 1e12,
           "mfu": flops / peak if peak else None, "mfu_real": real_flops / peak if peak else None,
           "epoch_minutes": EPOCH_WINDOWS / (cfg.global_batch / dt) / 60,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    if profile and device.type == "cuda":
        out |= busy_share(step, device)
    mfu = f", MFU {100 * out['mfu']:.1f}% ({100 * out['mfu_real']:.1f}% of real tokens)" if peak else ""
    print(f"adapt {out['model']}, T={cfg.seq_len}, CLIP {cfg.clip_blocks}x{width}, micro-batch {micro}, "
          f"{dtype_name} on {device}{', compiled' if cfg.compile else ''}: {dt:.3f} s/step, "
          f"{out['tokens_per_s']:,.0f} tokens/s, {out['tflops']:.2f} TFLOP/s{mfu}", flush=True)
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


def gpu_check(out_path):
    """The GPU check: CUDA tests, adaptation benchmarks, graph breaks; toy sizes on a machine without CUDA."""
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA: toy sizes, to show the check runs)",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "test_all.py", "-k", "test_cuda_"],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    report["cuda_tests"] = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]
    base, device = adapt.parse_args([] if cuda else ["--toy", "--global-batch", "16"]), "cuda" if cuda else "cpu"
    report["adapt"] = []
    for micro, compiled in ((8, False), (None, False), (None, True)):  # one micro-batch of 8; the automatic size
        cfg = replace(base, micro_batch=micro, compile=compiled)
        cfg = replace(cfg, global_batch=micro or adapt.micro_batch_size(cfg, 1, torch.device(device)))
        report["adapt"].append(bench_adapt(cfg, steps=5, profile=True))
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:  # graphs and graph breaks of one adaptation forward
        m, ds = synthetic_model(base, device, tmp, 4)
        batch = {k: v.to(device) for k, v in ds.batch(range(4), 0, 0).items()}
    explained = torch._dynamo.explain(lambda b: m(**b)["loss"])(batch)
    report |= {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count}
    report["finetune"] = bench_finetune(["bert-base" if cuda else "bert-toy"], 32, 128, 5, device)
    for f in report["finetune"]:  # App. C.2's RTE: 3 epochs, 9 seeds, full-length (128) batches: an upper bound
        seconds = RTE_TRAIN / f["train_examples_per_s"] + RTE_DEV / f["eval_examples_per_s"]
        f["rte_9_seeds_minutes"] = 9 * 3 * seconds / 60
    with xm.atomic_file(out_path, "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['device']}, torch {report['torch']}, {report['date']}; CUDA tests: {report['cuda_tests']}")
    print("| micro-batch | compiled | s/step | tokens/s | MFU | MFU real tokens | epoch min | peak GB | GPU busy |")
    print("|---|---|---|---|---|---|---|---|---|")
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
    for r in report["adapt"]:
        print(f"| {r['micro_batch']} | {r['compiled']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{pct(r['mfu'])} | {pct(r['mfu_real'])} | {r['epoch_minutes']:.1f} | "
              f"{r['peak_memory_gb'] or 0:.1f} | {pct(r.get('gpu_busy_share'))} |")
    for f in report["finetune"]:
        print(f"finetune {f['preset']} {f['dtype']}: {f['train_examples_per_s']:,.0f} train / "
              f"{f['eval_examples_per_s']:,.0f} eval examples/s; RTE's 9 seeds in {f['rte_9_seeds_minutes']:.1f} min")
    print(f"graphs {report['graphs']}, graph breaks {report['graph_breaks']}; written {out_path}")


def bench_cache(megabytes, bert_dir, clip_dir, steps=1, seed=0):
    """data.build_cache on a generated corpus in WikiText-103's raw format (` = Title = ` and ` = = Section = = `
    headings, blank lines, paragraphs with ` @-@ ` / ` @,@ `; words drawn Zipf-like from the BERT vocabulary, one in
    ten made up of several WordPieces): MB/s over wall time and per CPU-second (which a busy machine does not
    distort), the minutes WikiText-103 train would take, peak RSS. Returns the figures as a dict."""
    rng = np.random.default_rng(seed)
    vocab = data.bert_tokenizer(bert_dir).get_vocab()
    words = np.array([t for t in sorted(vocab, key=vocab.get) if t.isalpha() and t.isascii() and len(t) > 1])
    zipf = 1 / np.arange(1, len(words) + 1)
    syllables = np.array(["ka", "lor", "vin", "tes", "mar", "qu", "ex", "ion", "dru", "phe"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "wiki.bench.raw")
        with open(corpus, "w", encoding="utf-8") as f:
            while f.tell() < megabytes * 1e6:
                f.write(f" = {' '.join(rng.choice(words, 3)).title()} = \n \n")
                for _ in range(int(rng.integers(3, 8))):
                    f.write(f" = = {rng.choice(words).title()} = = \n \n")
                    for _ in range(int(rng.integers(1, 4))):
                        tokens = list(rng.choice(words, int(rng.integers(60, 200)), p=zipf / zipf.sum()))
                        for i in rng.integers(0, len(tokens), len(tokens) // 10):
                            tokens[i] = "".join(rng.choice(syllables, 4))
                        for i in rng.integers(0, len(tokens), 3):
                            tokens[i] = rng.choice([f"{rng.integers(1, 99)} @,@ {rng.integers(100, 999)}",
                                                    f"{tokens[i]} @-@ based", f"{tokens[i]} , ", "( 1914 )"])
                        f.write(f" {' '.join(tokens).capitalize()} . \n \n")
        size_mb, cpu, built = os.path.getsize(corpus) / 1e6, time.process_time(), []  # user + system, all threads
        build = lambda: built.append(data.build_cache(corpus, bert_dir, clip_dir, os.path.join(tmp, str(len(built))),
                                                      log=lambda _: None))
        wall = median_seconds(build, steps, warmup=0)
        cpu = (time.process_time() - cpu) / steps
        with open(os.path.join(built[0], "manifest.json")) as f:
            manifest = json.load(f)
    out = {"mb": size_mb, "wall_s": wall, "cpu_s": cpu, "mb_per_s": size_mb / wall, "mb_per_cpu_s": size_mb / cpu,
           "wikitext_minutes": WIKITEXT_TRAIN_MB / (size_mb / wall) / 60, "cores": os.cpu_count(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "windows": manifest["windows"],
           "clip_truncated_fraction": manifest["clip_truncated_fraction"], "clip_blocks": manifest["key"]["n_blocks"]}
    print(f"{size_mb:.1f} MB in {wall:.1f} s wall, {cpu:.1f} CPU-s: {out['mb_per_s']:.2f} MB/s wall, "
          f"{out['mb_per_cpu_s']:.2f} MB per CPU-s; WikiText-103 train ({WIKITEXT_TRAIN_MB} MB): "
          f"{out['wikitext_minutes']:.1f} min at this wall rate, "
          f"{WIKITEXT_TRAIN_MB / out['mb_per_cpu_s'] / out['cores'] / 60:.1f} min if all {out['cores']} cores were "
          f"free; peak RSS {out['peak_rss_mb']:.0f} MB; {out['windows']} windows, "
          f"{100 * out['clip_truncated_fraction']:.2f}% truncated in {out['clip_blocks']} CLIP blocks")
    return out


def bench_finetune(presets, batch_size, seq_len, steps, device):
    """Finetuning examples/s of a classifier (finetune.Finetuner) on random full-length inputs: forward + backward +
    AdamW step, and the eval forward; fp32 and, on CUDA, bf16 (finetune.py's default there) -> a list of dicts."""
    device = torch.device(device)
    dtypes = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {' and '.join(dtypes)}"
          f"{'' if device.type == 'cuda' else ' only (bf16 is measured on CUDA)'}, batch {batch_size} x {seq_len} "
          f"tokens, median of {steps} steps after 1 warm-up")
    figures = []
    for preset, dtype in itertools.product(presets, dtypes):
        cfg, bf16 = xm.PRESETS[preset], dtype == "bf16"
        torch.manual_seed(0)
        net = finetune.Finetuner(xm.LanguageEncoder(cfg), "classification", 2).to(device)
        optimizer = finetune.adamw(net.parameters(), device)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (batch_size,), device=device)}

        def train_step():
            net.train()
            with finetune.autocast(device, bf16):
                finetune.loss_fn("classification", net(b), b["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def eval_step():
            net.eval()
            with torch.no_grad(), finetune.autocast(device, bf16):
                net(b)

        train_s, eval_s = (median_seconds(step, steps, warmup=1, device=device) for step in (train_step, eval_step))
        figures.append({"preset": preset, "dtype": dtype, "train_examples_per_s": batch_size / train_s,
                        "eval_examples_per_s": batch_size / eval_s, "train_step_s": train_s})
        print(f"{preset:10s} {dtype} train {batch_size / train_s:8.1f} examples/s ({train_s * 1e3:.0f} ms/step), "
              f"eval {batch_size / eval_s:8.1f} examples/s", flush=True)
    return figures


def bench_model(steps, memory_of=None):
    """Forward+backward of our BERT-base (8 x 128) and CLIP-T (72 x 77) against transformers' sdpa on the same weights
    and inputs: median time; peak step memory (README) in a fresh process per memory_of=(preset, shape, impl)."""
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["adapt", "cache", "finetune", "gpu", "model"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="gpu: the JSON file (default $OUT/gpu_check.json)")
    args, rest = p.parse_known_args(argv)
    try:
        if args.what == "gpu":
            gpu_check(args.out or os.path.join(os.environ.get("OUT") or tempfile.mkdtemp(), "gpu_check.json"))
        elif args.what == "cache":
            c = argparse.ArgumentParser(prog="bench.py cache", description=bench_cache.__doc__)
            c.add_argument("--mb", type=float, default=50, help="size of the generated corpus in MB")
            c.add_argument("--data", default="data", help="data root holding ckpt/")
            c.add_argument("--bert", help="BERT checkpoint dir (default DATA/ckpt/bert-base)")
            c.add_argument("--clip", help="CLIP checkpoint dir (default DATA/ckpt/clip)")
            a = c.parse_args(rest)
            bench_cache(a.mb, a.bert or os.path.join(a.data, "ckpt", "bert-base"),
                        a.clip or os.path.join(a.data, "ckpt", "clip"), args.steps)
        elif args.what == "finetune":
            f = argparse.ArgumentParser(prog="bench.py finetune")
            f.add_argument("--presets", nargs="+", default=["bert-toy", "bert-base"],
                           choices=[k for k, v in xm.PRESETS.items() if isinstance(v, xm.EncoderConfig)])
            f.add_argument("--batch-size", type=int, default=32)
            f.add_argument("--max-len", type=int, default=128)
            f.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
            a = f.parse_args(rest)
            bench_finetune(a.presets, a.batch_size, a.max_len, args.steps, a.device)
        elif args.what == "model":
            bench_model(args.steps)
        else:
            bench_adapt(adapt.parse_args(rest), args.steps)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"bench.py: {e}") from None


if __name__ == "__main__":
    main()
