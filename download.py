"""Fetch and verify XDBERT's public checkpoints and data sets, or build the offline toy kit.

    python download.py                       # the main experiment: bert-base clip wikitext glue
    python download.py bert-large electra-base swag read coco rte   # any of the names in ITEMS
    python download.py --dry-run all         # what would be fetched, with sizes, and nothing else
    python download.py bert-base --force     # fetch again and replace files already there (a damaged checkpoint)
    python download.py bert-base --mirror hf=https://hf-mirror.com   # another base URL (or XDBERT_MIRROR_HF=...)
    python download.py --toy                 # the offline toy kit in data/toy: runs `python toy.py` (no network)
"""
import argparse
import contextlib
import csv
import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import requests

SOURCES = {  # name -> base URLs, tried in order (only WikiText-103 has more than one; the original S3 zip is gone)
    "hf": ("https://huggingface.co",),
    "fb": ("https://dl.fbaipublicfiles.com",),
    "wikitext": ("https://wikitext.smerity.com",
                 "https://huggingface.co/datasets/mattdangerw/wikitext-103-raw/resolve/main"),
    "swag": ("https://raw.githubusercontent.com/rowanz/swagaf/master/data",),
    "coco": ("http://images.cocodataset.org",),
}


@dataclass(frozen=True)
class Remote:
    """One file: <base of `source`>/<path>, saved as DATA/<dest>; size and sha256 only where published."""
    source: str
    path: str
    dest: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Item:
    """A name on the command line: its remotes are fetched, `build` makes its outputs from them, `check` validates
    them; done when every output (else every remote's dest) exists."""
    name: str
    remotes: tuple[Remote, ...]
    outputs: tuple[str, ...] = ()
    build: Callable[[Path], None] | None = None
    check: Callable[[Path], None] | None = None

    def done(self, root: Path) -> bool:
        return all((root / out).exists() for out in self.outputs or [r.dest for r in self.remotes])


class DownloadError(Exception):
    """A failure the user has to act on; the message names the URL or file and says what to do next."""


BERT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
ELECTRA_FILES = ("config.json", "pytorch_model.bin", "tokenizer.json", "vocab.txt")  # no safetensors on main
HUB = {"bert-base": ("google-bert/bert-base-uncased", BERT_FILES),  # name -> (hub id, the files as published)
       "bert-large": ("google-bert/bert-large-uncased", BERT_FILES),
       "electra-base": ("google/electra-base-discriminator", ELECTRA_FILES),
       "electra-large": ("google/electra-large-discriminator", ELECTRA_FILES),
       "clip": ("openai/clip-vit-base-patch32", ("config.json", "pytorch_model.bin", "tokenizer.json"))}
CHECKPOINTS = tuple(Item(name, tuple(Remote("hf", f"{hub}/resolve/main/{f}", f"ckpt/{name}/{f}") for f in files))
                    for name, (hub, files) in HUB.items())  # DATA/ckpt/<name>/<file>


@contextlib.contextmanager
def new_folder(path: Path):
    """A temporary sibling folder to fill; once filled (and fsynced) it replaces path: path is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(path, ignore_errors=True)  # --force
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack(root: Path, archive: str, folder: str, suffix: str, out: str) -> None:
    """The zip's files directly in `folder` ending in `suffix`, into DATA/<out>; a corrupt or wrong zip is removed."""
    path = root / archive
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if posixpath.dirname(m) == folder and m.endswith(suffix)]
            if members:
                with new_folder(root / out) as tmp:
                    for member in members:
                        with zf.open(member) as src, open(tmp / posixpath.basename(member), "wb") as f:
                            shutil.copyfileobj(src, f, 1 << 20)
                return
        problem = f"has no {folder}/*{suffix}, so the mirror serves another archive"
    except zipfile.BadZipFile as err:
        problem = f"is not a valid zip ({err})"
    path.unlink()
    raise DownloadError(f"{path} {problem}; it was removed: run the same command again or pass another --mirror")


def zip_item(name: str, remote: Remote, folder: str, suffix: str, out: str) -> Item:
    return Item(name, (remote,), (out,), lambda root: unpack(root, remote.dest, folder, suffix, out))


def staged(source: str, path: str, size: int | None = None, sha256: str | None = None) -> Remote:
    """A file fetched into DATA/downloads/ to build an item from (deleted once it is built)."""
    return Remote(source, path, f"downloads/{posixpath.basename(path)}", size, sha256)


WIKITEXT = zip_item("wikitext", staged("wikitext", "wikitext-103-raw-v1.zip", 191_984_949,
                                       "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"),
                    "wikitext-103-raw", ".raw", "wikitext-103-raw")
COCO = zip_item("coco", staged("coco", "annotations/annotations_trainval2017.zip"), "annotations",
                "captions_train2017.json", "coco")
GLUE_ZIPS = {  # name -> (the task's folder in its zip and under DATA/glue/, the zip); the folder's .tsv are the splits
    "cola": ("CoLA", "CoLA"), "sst2": ("SST-2", "SST-2"), "stsb": ("STS-B", "STS-B"), "qqp": ("QQP", "QQP-clean"),
    "mnli": ("MNLI", "MNLI"), "qnli": ("QNLI", "QNLIv2"), "rte": ("RTE", "RTE"), "wnli": ("WNLI", "WNLI")}
GLUE = tuple(zip_item(name, staged("fb", f"glue/data/{zip_name}.zip"), folder, ".tsv", f"glue/{folder}")
             for name, (folder, zip_name) in GLUE_ZIPS.items())
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def build_mrpc(root: Path) -> None:
    """GLUE's MRPC from SentEval's MSR paraphrase files, as GLUE's download script builds it: dev = the train rows
    listed in mrpc_dev_ids.tsv, test with an index column (byte-order marks dropped)."""
    def rows(name):
        with open(root / "downloads" / name, encoding="utf-8-sig") as f:
            return [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    dev_ids = {tuple(r) for r in rows("mrpc_dev_ids.tsv")}
    train = rows("msr_paraphrase_train.txt")[1:]
    dev = [r for r in train if (r[1], r[2]) in dev_ids]
    if len(dev) != len(dev_ids):
        raise DownloadError(f"only {len(dev)} of the {len(dev_ids)} MRPC dev ids are in msr_paraphrase_train.txt: "
                            f"delete {root / 'downloads'} and run `python download.py mrpc` again")
    test = [[str(i), *r[1:]] for i, r in enumerate(rows("msr_paraphrase_test.txt")[1:])]
    with new_folder(root / "glue" / "MRPC") as out:
        for name, header, records in [("train.tsv", MRPC_HEADER, [r for r in train if (r[1], r[2]) not in dev_ids]),
                                      ("dev.tsv", MRPC_HEADER, dev),
                                      ("test.tsv", "index" + MRPC_HEADER.removeprefix("Quality"), test)]:
            (out / name).write_text("".join(f"{line}\n" for line in [header, *map("\t".join, records)]), "utf-8")


MRPC = Item("mrpc", tuple(staged("fb", path) for path in ("senteval/senteval_data/msr_paraphrase_train.txt",
                                                           "senteval/senteval_data/msr_paraphrase_test.txt",
                                                           "glue/data/mrpc_dev_ids.tsv")), ("glue/MRPC",), build_mrpc)
AX = Item("ax", (Remote("fb", "glue/data/AX.tsv", "glue/AX/AX.tsv"),))  # GLUE's diagnostic set
SWAG = Item("swag", tuple(Remote("swag", f"{s}.csv", f"swag/{s}.csv") for s in ("train", "val", "test")))

COMMONLIT_HEADER = ["id", "url_legal", "license", "excerpt", "target", "standard_error"]
COMMONLIT_ROWS = 2834
READ_HELP = """\
READ (CommonLit Readability Prize) needs a Kaggle login, so it cannot be fetched here: sign in at
https://www.kaggle.com, accept the rules at https://www.kaggle.com/competitions/commonlitreadabilityprize/rules,
download the data with `kaggle competitions download -c commonlitreadabilityprize` (or the page's "Download All"
button), unzip it, put train.csv (2834 excerpts, about 2.8 MB) at {path} and run `python download.py read`."""


def check_commonlit(root: Path) -> None:
    """The CommonLit train.csv the user put in place: its header, 2834 rows and a numeric target in each."""
    path = root / "read" / "train.csv"
    if not path.is_file():
        raise DownloadError(f"no CommonLit train.csv at {path}: follow the steps above, then run it again")
    with open(path, newline="", encoding="utf-8-sig") as f:
        header, *records = list(csv.reader(f)) or [[]]
    if header != COMMONLIT_HEADER:
        raise DownloadError(f"{path} has the columns {header}, not {','.join(COMMONLIT_HEADER)}: "
                            f"put the competition's train.csv there (not test.csv or sample_submission.csv)")
    for i, row in enumerate(records, 1):
        if len(row) != len(COMMONLIT_HEADER) or not re.fullmatch(r"-?\d+(\.\d*)?([eE][-+]?\d+)?", row[4]):
            raise DownloadError(f"{path}: record {i} has no numeric target: download train.csv again")
    if len(records) != COMMONLIT_ROWS:
        raise DownloadError(f"{path} has {len(records)} records, the CommonLit train.csv has {COMMONLIT_ROWS}: "
                            f"download train.csv again")


READ = Item("read", (), ("read/train.csv",), check=check_commonlit)
ITEMS = {item.name: item for item in (*CHECKPOINTS, WIKITEXT, *GLUE, MRPC, AX, SWAG, READ, COCO)}
GROUPS = {
    "glue": ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"),
    "main": ("bert-base", "clip", "wikitext", "glue"),  # what the main experiment needs (the default)
    "all": tuple(ITEMS),
}


def expand(names) -> list[Item]:
    """Command-line names (items and GROUPS) -> items, in order, without repeats."""
    out = {}
    for name in names:
        if name not in GROUPS and name not in ITEMS:
            raise DownloadError(f"unknown name {name!r}: choose from {', '.join([*GROUPS, *ITEMS])}")
        out.update((item.name, item) for item in (expand(GROUPS[name]) if name in GROUPS else [ITEMS[name]]))
    return list(out.values())


def mirror_bases(overrides: list[str], environ=os.environ) -> dict[str, tuple[str, ...]]:
    """SOURCES with the bases replaced by XDBERT_MIRROR_<NAME> and then by --mirror NAME=URL."""
    variables = {f"XDBERT_MIRROR_{name.upper()}": name for name in SOURCES}
    specs = [(var, variables[var], url) for var, url in environ.items() if var in variables and url]
    specs += [(f"--mirror {spec}", *spec.partition("=")[::2]) for spec in overrides]
    bases = dict(SOURCES)
    for where, name, url in specs:
        if name not in SOURCES:
            raise DownloadError(f"{where}: write NAME=URL with NAME one of {', '.join(SOURCES)}")
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise DownloadError(f"{where}: {url!r} is not an http:// or https:// URL: write the scheme, e.g. "
                                f"http://127.0.0.1:8000")
        bases[name] = (url,)
    return bases


@dataclass(frozen=True)
class DownloadConfig:
    """The command line's settings."""
    data: Path = Path("data")
    names: tuple[str, ...] = ("main",)
    bases: dict[str, tuple[str, ...]] = field(default_factory=SOURCES.copy)  # after mirror_bases
    timeout: float = 30.0   # seconds of silence from a server before a try is given up and retried
    retries: int = 5        # retries in a row without progress before giving up (the .part is kept)
    backoff: float = 1.0    # seconds before the first retry, doubling with each
    force: bool = False     # fetch again and replace what is there
    dry_run: bool = False

# ----------------------------------------------------------------------------- fetching one file


def fetch(url: str, dest: Path, cfg: DownloadConfig, size: int | None = None, sha256: str | None = None) -> Path:
    """url to dest (README, "download.py") unless dest is there with the published size and sha256 (and no --force)."""
    if dest.exists() and not cfg.force:
        if not (problem := mismatch(dest, size, sha256)):
            return dest
        print(f"{dest} {problem}: fetching it again", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with requests.Session() as session, open(part, "ab") as f:
        held = False
        with contextlib.suppress(BlockingIOError, FileNotFoundError):  # a second download of the file stops at once
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.path.samestat(os.stat(part), os.fstat(f.fileno()))  # not renamed into place meanwhile
        if not held:
            raise DownloadError(f"another process is downloading {dest} (it holds {part}): let it finish, then run "
                                f"the same command again")
        size = size or remote_size(session, url, cfg.timeout)
        failures, best = 0, f.tell()
        try:
            while why := stream(session, url, f, size, cfg.timeout):
                failures, best = (0 if f.tell() > best else failures + 1), max(best, f.tell())
                if failures > cfg.retries:
                    raise DownloadError(f"{url}: no progress in {failures} attempt(s) (the last: {why}); check the "
                                        f"network or pass another --mirror, then run the same command to resume")
                wait = cfg.backoff * 2 ** (failures - 1) if failures else 0
                then = f"retry {failures} of {cfg.retries} in {wait:g} s" if failures else "resuming"
                print(f"{url}: {why}; {then}", file=sys.stderr)
                time.sleep(wait)
        except BaseException:
            if f.tell() == 0:
                part.unlink()
            raise
        f.flush()
        if problem := mismatch(part, size, sha256):
            part.unlink()
            raise DownloadError(f"{url}: the download {problem}; it was removed: run the same command again or pass "
                                f"another --mirror")
        os.fsync(f.fileno())  # the bytes on disk before the name: a power loss cannot leave an empty dest
        os.replace(part, dest)
    return dest


def stream(session: requests.Session, url: str, f, size: int | None, timeout: float) -> str | None:
    """One GET into the open .part file f (a 206 to our Range appends, a 200 starts over): None once the body is
    complete, else why the try failed, in a few words; a 4xx is a DownloadError."""
    have = f.tell()
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code >= 500:
                return f"HTTP {r.status_code} {r.reason}"
            if r.status_code >= 400 and r.status_code != 416:
                raise DownloadError(f"HTTP {r.status_code} {r.reason} for {url}: check the URL (or the --mirror base)")
            if r.status_code != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                f.seek(0)
                f.truncate()
                if r.status_code != 200:  # 416, or a range we did not ask for
                    return f"the server cannot resume at byte {have} (HTTP {r.status_code}); starting over"
                have = 0
            total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else size
            progress = Progress(Path(f.name).name.removesuffix(".part"), have, total)
            for chunk in r.iter_content(1 << 16):
                f.write(chunk)
                have += len(chunk)
                progress.update(have)
            progress.update(have, last=True)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        if isinstance(err, requests.Timeout) or "timed out" in str(err):
            return f"no data for {timeout:g} s (--timeout)"
        cause = re.search(r"\[Errno -?\d+\] ([^'\"]+)|(Connection broken)", str(err))  # not urllib3's paragraph
        return (cause[1] or cause[2]) if cause else str(err)
    return f"the connection closed after {have} of {total} bytes" if total is not None and have < total else None


def remote_size(session: requests.Session, url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request (following redirects), or None."""
    try:
        r = session.head(url, allow_redirects=True, timeout=timeout, headers={"Accept-Encoding": "identity"})
        return (int(r.headers.get("Content-Length", 0)) if r.ok else 0) or None  # 0: the server did not say
    except (requests.RequestException, ValueError):
        return None


def mismatch(path: Path, size: int | None, sha256: str | None) -> str | None:
    """How a file differs from its known size and sha256, or None."""
    if size is not None and path.stat().st_size != size:
        return f"has {path.stat().st_size} bytes, not {size}"
    if sha256 is not None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256:
            return f"has sha256 {digest}, not {sha256}"
    return None


def human(n: float) -> str:
    """Bytes in decimal units: 191984949 -> '192.0 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


class Progress:
    """Bytes, rate and ETA on stderr: one line redrawn in place on a terminal, else a line per 10% (or minute)."""

    def __init__(self, name: str, have: int, total: int | None):
        self.name, self.total, self.start, self.shown = name, total, have, have
        self.t0 = self.shown_at = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, have: int, last: bool = False) -> None:
        now = time.monotonic()
        next_tenth = self.total and 10 * have // self.total > 10 * self.shown // self.total
        if not (now - self.shown_at >= (0.2 if self.tty else 60) or (last if self.tty else next_tenth)):
            return
        rate = (have - self.start) / max(now - self.t0, 1e-9)
        line = f"  {self.name}  {human(have)}"
        if self.total:
            eta = timedelta(seconds=round((self.total - have) / rate)) if rate > 0 else "?"
            line += f" / {human(self.total)} ({100 * have // self.total}%)  {human(rate)}/s  ETA {eta}"
        else:
            line += f"  {human(rate)}/s"
        end = "\n" if last or not self.tty else ""
        print(f"\r{line:79}" if self.tty else line, end=end, file=sys.stderr, flush=True)
        self.shown, self.shown_at = have, now

# ----------------------------------------------------------------------------- items: plan, fetch, build


def fetch_remote(remote: Remote, cfg: DownloadConfig) -> Path:
    """A Remote from the first of its source's bases that delivers it."""
    *others, last = [f"{base.rstrip('/')}/{remote.path}" for base in cfg.bases[remote.source]]
    for url in others:
        try:
            return fetch(url, cfg.data / remote.dest, cfg, remote.size, remote.sha256)
        except DownloadError as err:
            print(f"{err}; trying the next mirror", file=sys.stderr)
    return fetch(last, cfg.data / remote.dest, cfg, remote.size, remote.sha256)


def download(cfg: DownloadConfig) -> None:
    """The plan with sizes; then each item not done (or all, with cfg.force) fetched and built, checked, on its own."""
    items, total, unknown = expand(cfg.names), 0, 0
    print(f"data directory: {cfg.data}")
    with requests.Session() as session:
        for item in items:
            if item.done(cfg.data) and not cfg.force:
                print(f"  {item.name:14} present, skipped (--force fetches it again)")
                continue
            if not item.remotes:
                print(f"  {item.name:14} manual download:\n" + READ_HELP.format(path=cfg.data / item.outputs[0]))
            for remote in item.remotes:
                url = f"{cfg.bases[remote.source][0].rstrip('/')}/{remote.path}"
                size = remote.size or remote_size(session, url, cfg.timeout)
                total, unknown = total + (size or 0), unknown + (size is None)
                print(f"  {item.name:14} {url}  {human(size) if size else 'size unknown'}")
    print(f"to fetch: {human(total)}" + (f" + {unknown} files of unknown size" if unknown else ""))
    if cfg.dry_run:
        return
    failed = []
    for item in items:
        try:
            if cfg.force or not item.done(cfg.data):
                for remote in item.remotes:
                    fetch_remote(remote, cfg)
                if item.build:
                    item.build(cfg.data)
                    for remote in item.remotes:
                        (cfg.data / remote.dest).unlink()
                    with contextlib.suppress(OSError):  # downloads/, once empty
                        (cfg.data / "downloads").rmdir()
            if item.check:
                item.check(cfg.data)
            print(f"{item.name}: ok")
        except DownloadError as err:
            print(f"{item.name}: {err}", file=sys.stderr)
            failed.append(item.name)
    if failed:
        raise DownloadError(f"not done: {' '.join(failed)}; fix the errors above and run "
                            f"`python download.py {' '.join(failed)}` again")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["main"],
                        help=f"what to fetch (default main): {', '.join([*GROUPS, *ITEMS])}")
    parser.add_argument("--data", help="data root (default data, or data/toy with --toy)")
    parser.add_argument("--mirror", action="append", default=[], metavar="NAME=URL",
                        help=f"replace a source's base URL; NAME is one of {', '.join(SOURCES)}")
    parser.add_argument("--dry-run", action="store_true", help="show what would be fetched and stop")
    parser.add_argument("--force", action="store_true", help="fetch the names again and replace files already there")
    parser.add_argument("--timeout", type=float, default=DownloadConfig.timeout, metavar="SECONDS",
                        help=f"silence from a server before a try is retried (default {DownloadConfig.timeout:g})")
    parser.add_argument("--toy", action="store_true", help="build the offline toy kit (no network)")
    args = parser.parse_args(argv)
    root = Path(args.data or ("data/toy" if args.toy else "data"))
    if args.toy:
        if subprocess.run([sys.executable, str(Path(__file__).with_name("toy.py")), "--data", str(root)]).returncode:
            raise SystemExit("the toy kit was not built: see the error above")
        return
    try:
        if not args.timeout > 0:
            raise DownloadError(f"--timeout {args.timeout}: give a positive number of seconds")
        download(DownloadConfig(root, tuple(args.names), mirror_bases(args.mirror), args.timeout, force=args.force,
                                dry_run=args.dry_run))
    except DownloadError as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
