"""Fetch and verify XDBERT's public checkpoints and data sets, or build the offline toy kit.

    python download.py                       # the main experiment: bert-base clip wikitext glue
    python download.py bert-large electra-base swag read coco rte   # any of the names in ITEMS
    python download.py --dry-run all         # what would be fetched, with sizes, and nothing else
    python download.py --toy                 # the offline toy kit in data/toy: runs `python toy.py` (no network)

Everything lands in the layout of README.md ("Data layout") under --data (default data): ckpt/<name>/, wikitext-103-raw/,
glue/<Task>/, swag/, read/train.csv, coco/captions_train2017.json. Checkpoints are kept exactly as the hub
publishes them (model.safetensors or pytorch_model.bin): model.from_hf reads either, so nothing is converted.

Each file is streamed to <file>.part, resumed with an HTTP Range request after an interruption, retried with
backoff, checked against its size and sha256 where known (sources.md) and only then renamed into place, so a
file under its final name is always complete; a file already there and verified is not fetched again.

Mirrors: every source's base URL can be replaced, by `--mirror NAME=URL` (repeatable) or the environment
variable XDBERT_MIRROR_<NAME>, e.g. `--mirror hf=https://hf-mirror.com` or XDBERT_MIRROR_HF=http://127.0.0.1:8000.
NAME is one of the keys of SOURCES; a replaced base serves the same paths below it.
"""
import argparse
import csv
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import requests

# ----------------------------------------------------------------------------------------------------------------------
# What to fetch (sources.md)

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
    """A name on the command line: done when every output exists; `build` turns the fetched files into the outputs
    (the fetched files that are not outputs are deleted afterwards); `check` validates the outputs."""
    name: str
    remotes: tuple[Remote, ...]
    outputs: tuple[str, ...]
    build: Callable[[Path], None] | None = None
    check: Callable[[Path], None] | None = None


class DownloadError(Exception):
    """A failure the user has to act on; the message names the URL or file and says what to do next."""


def checkpoint(name: str, hub_id: str, files: tuple[str, ...]) -> Item:
    """A hub checkpoint as published: DATA/ckpt/<name>/<file> from huggingface.co/<hub_id>/resolve/main/<file>."""
    remotes = tuple(Remote("hf", f"{hub_id}/resolve/main/{f}", f"ckpt/{name}/{f}") for f in files)
    return Item(name, remotes, tuple(r.dest for r in remotes))


BERT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
ELECTRA_FILES = ("config.json", "pytorch_model.bin", "tokenizer.json", "vocab.txt")  # no safetensors on main
CHECKPOINTS = (
    checkpoint("bert-base", "google-bert/bert-base-uncased", BERT_FILES),
    checkpoint("bert-large", "google-bert/bert-large-uncased", BERT_FILES),
    checkpoint("electra-base", "google/electra-base-discriminator", ELECTRA_FILES),
    checkpoint("electra-large", "google/electra-large-discriminator", ELECTRA_FILES),
    checkpoint("clip", "openai/clip-vit-base-patch32", ("config.json", "pytorch_model.bin", "tokenizer.json")),
)


def unpack_zip(zip_dest: str, members: dict[str, str], root: Path) -> None:
    """Extract the zip's `members` (name in the zip -> path under DATA), each through a temporary file + os.replace;
    an archive that is corrupt or lacks a member is removed."""
    archive = root / zip_dest
    try:
        with zipfile.ZipFile(archive) as zf:
            missing = [m for m in members if m not in set(zf.namelist())]
            for member, dest in {} if missing else members.items():
                out = root / dest
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(f"{out}.tmp", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(f"{out}.tmp", out)
    except zipfile.BadZipFile as err:
        archive.unlink()
        raise DownloadError(f"{archive} is not a valid zip ({err}); it was removed: run the same command again")
    if missing:
        archive.unlink()
        raise DownloadError(f"{archive} has no {missing[0]}, so the mirror serves another archive; it was removed: "
                            f"pass another --mirror")


def zip_item(name: str, remote: Remote, members: dict[str, str]) -> Item:
    return Item(name, (remote,), tuple(members.values()), functools.partial(unpack_zip, remote.dest, members))


WIKITEXT = zip_item(
    "wikitext",
    Remote("wikitext", "wikitext-103-raw-v1.zip", "downloads/wikitext-103-raw-v1.zip", 191_984_949,
           "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"),
    {f"wikitext-103-raw/wiki.{s}.raw": f"wikitext-103-raw/wiki.{s}.raw" for s in ("train", "valid", "test")})

SPLITS = ("train.tsv", "dev.tsv", "test.tsv")
GLUE_ZIPS = {  # CLI name -> (task dir, zip name, files)
    "cola": ("CoLA", "CoLA", SPLITS), "sst2": ("SST-2", "SST-2", SPLITS), "stsb": ("STS-B", "STS-B", SPLITS),
    "qqp": ("QQP", "QQP-clean", SPLITS), "qnli": ("QNLI", "QNLIv2", SPLITS), "rte": ("RTE", "RTE", SPLITS),
    "wnli": ("WNLI", "WNLI", SPLITS),
    "mnli": ("MNLI", "MNLI", ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv", "test_matched.tsv",
                              "test_mismatched.tsv")),
}


def glue_zip(name: str, task: str, zip_name: str, files: tuple[str, ...]) -> Item:
    remote = Remote("fb", f"glue/data/{zip_name}.zip", f"downloads/{zip_name}.zip")
    return zip_item(name, remote, {f"{task}/{f}": f"glue/{task}/{f}" for f in files})


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def write_lines(path: Path, lines: list[str]) -> None:
    """Lines with '\\n' endings, written to <path>.tmp and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8", newline="") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(f"{path}.tmp", path)


def build_mrpc(root: Path) -> None:
    """GLUE's MRPC from SentEval's MSR paraphrase files: dev = the train rows listed in mrpc_dev_ids.tsv; test gets an
    index column (as GLUE's download_glue_data.py does; the byte-order mark is dropped)."""
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
    out = root / "glue" / "MRPC"
    write_lines(out / "dev.tsv", [MRPC_HEADER, *("\t".join(r) for r in dev)])
    write_lines(out / "train.tsv", [MRPC_HEADER, *("\t".join(r) for r in train if (r[1], r[2]) not in dev_ids)])
    write_lines(out / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", *("\t".join(r) for r in test)])


MRPC = Item("mrpc", (
    Remote("fb", "senteval/senteval_data/msr_paraphrase_train.txt", "downloads/msr_paraphrase_train.txt"),
    Remote("fb", "senteval/senteval_data/msr_paraphrase_test.txt", "downloads/msr_paraphrase_test.txt"),
    Remote("fb", "glue/data/mrpc_dev_ids.tsv", "downloads/mrpc_dev_ids.tsv"),
), tuple(f"glue/MRPC/{f}" for f in SPLITS), build_mrpc)

AX = Item("ax", (Remote("fb", "glue/data/AX.tsv", "glue/AX/AX.tsv"),), ("glue/AX/AX.tsv",))  # GLUE's diagnostic

SWAG = Item("swag", tuple(Remote("swag", f"{s}.csv", f"swag/{s}.csv") for s in ("train", "val", "test")),
            tuple(f"swag/{s}.csv" for s in ("train", "val", "test")))

COCO = zip_item("coco", Remote("coco", "annotations/annotations_trainval2017.zip",
                               "downloads/annotations_trainval2017.zip"),
                {"annotations/captions_train2017.json": "coco/captions_train2017.json"})

COMMONLIT_HEADER = ["id", "url_legal", "license", "excerpt", "target", "standard_error"]
COMMONLIT_ROWS = 2834
READ_HELP = """\
READ (CommonLit Readability Prize) needs a Kaggle login, so it cannot be fetched here:
  1. sign in at https://www.kaggle.com and accept the rules at
     https://www.kaggle.com/competitions/commonlitreadabilityprize/rules
  2. download the data: `kaggle competitions download -c commonlitreadabilityprize`
     (or the "Download All" button at https://www.kaggle.com/competitions/commonlitreadabilityprize/data)
  3. unzip it and put train.csv (2834 excerpts, about 2.8 MB) at {path}
  4. run `python download.py read` to check the file."""


def check_commonlit(root: Path) -> None:
    """The CommonLit train.csv the user put in place: its header, 2834 rows and a numeric target in each."""
    path = root / "read" / "train.csv"
    if not path.is_file():
        raise DownloadError(f"no CommonLit train.csv at {path}: follow the steps above, then run "
                            f"`python download.py read` again")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != COMMONLIT_HEADER:
        raise DownloadError(f"{path} has the columns {rows[0] if rows else []}, not {','.join(COMMONLIT_HEADER)}: "
                            f"put the competition's train.csv there (not test.csv or sample_submission.csv)")
    for i, row in enumerate(rows[1:], 1):
        if len(row) != len(COMMONLIT_HEADER) or not is_number(row[4]):
            raise DownloadError(f"{path}: record {i} has no numeric target: download train.csv again")
    if len(rows) - 1 != COMMONLIT_ROWS:
        raise DownloadError(f"{path} has {len(rows) - 1} records, the CommonLit train.csv has {COMMONLIT_ROWS}: "
                            f"download train.csv again")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


READ = Item("read", (), ("read/train.csv",), check=check_commonlit)

ITEMS = {item.name: item for item in (
    *CHECKPOINTS, WIKITEXT, *(glue_zip(name, *spec) for name, spec in GLUE_ZIPS.items()), MRPC, AX, SWAG, READ, COCO)}
GROUPS = {
    "glue": ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"),
    "main": ("bert-base", "clip", "wikitext", "glue"),  # what the main experiment needs (the default)
    "all": tuple(ITEMS),
}


def expand(names: list[str]) -> list[Item]:
    """Command-line names (items and GROUPS) -> items, in order, without repeats."""
    out = {}
    for name in names:
        if name in GROUPS:
            out.update((item.name, item) for item in expand(list(GROUPS[name])))
        elif name in ITEMS:
            out[name] = ITEMS[name]
        else:
            raise SystemExit(f"unknown name {name!r}: choose from {', '.join([*GROUPS, *ITEMS])}")
    return list(out.values())


def mirror_bases(overrides: list[str], environ=os.environ) -> dict[str, tuple[str, ...]]:
    """SOURCES with the bases replaced by XDBERT_MIRROR_<NAME> and then by --mirror NAME=URL."""
    bases = dict(SOURCES)
    for name in SOURCES:
        if url := environ.get(f"XDBERT_MIRROR_{name.upper()}"):
            bases[name] = (url,)
    for spec in overrides:
        name, sep, url = spec.partition("=")
        if not sep or name not in SOURCES:
            raise SystemExit(f"--mirror {spec!r}: write NAME=URL with NAME one of {', '.join(SOURCES)}")
        bases[name] = (url,)
    return bases


def url_of(remote: Remote, base: str) -> str:
    return f"{base.rstrip('/')}/{remote.path}"

# ----------------------------------------------------------------------------------------------------------------------
# Fetching one file: stream to .part, resume with Range, retry, verify, rename


class _Transient(Exception):
    """A failure worth another try (a 5xx, a short body, a refused resume)."""


TRANSIENT = (_Transient, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def fetch(url: str, dest, *, size: int | None = None, sha256: str | None = None,
          session: requests.Session | None = None, retries: int = 5, backoff: float = 1.0,
          timeout: float = 60.0) -> Path:
    """Download url to dest unless dest is already there and verifies. After `retries` failed tries in a row that
    made no progress it gives up, keeping the .part file for the next run to resume."""
    dest = Path(dest)
    if dest.exists():
        if verifies(dest, size, sha256):
            return dest
        print(f"{dest} does not match its published size or sha256: fetching it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    failures = 0
    while True:
        before = file_size(part)
        try:
            stream(session, url, part, timeout)
            break
        except TRANSIENT as err:
            failures = 0 if file_size(part) > before else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: no progress in {failures} attempt(s) (the last: {err}); check the "
                                    f"network or pass another --mirror, then run the same command to resume") from None
            time.sleep(min(60.0, backoff * 2 ** failures))
    check_download(part, url, size, sha256)
    os.replace(part, dest)
    return dest


def stream(session: requests.Session, url: str, part: Path, timeout: float) -> None:
    """One GET into part: append after a 206 answer to our Range request, start over after a 200."""
    have = file_size(part)
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code >= 500:
            raise _Transient(f"HTTP {r.status_code}")
        if r.status_code == 416:
            part.unlink()
            raise _Transient("the server cannot resume this partial file (HTTP 416); starting over")
        if r.status_code >= 400:
            raise DownloadError(f"HTTP {r.status_code} {r.reason} for {url}: check the URL (or the --mirror base)")
        if r.status_code == 206:
            total = resumed_total(r, have, part)
        else:
            have, total = 0, int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        progress = Progress(part.name.removesuffix(".part"), have, total)
        with open(part, "ab" if have else "wb") as f:
            for chunk in r.iter_content(1 << 16):
                f.write(chunk)
                have += len(chunk)
                progress.update(have)
        progress.close()
    if total is not None and have != total:
        raise _Transient(f"the connection closed after {have} of {total} bytes")


def resumed_total(r: requests.Response, have: int, part: Path) -> int | None:
    """The full size from a 206's Content-Range 'bytes START-END/TOTAL'; a range not starting at `have` restarts."""
    span, _, total = r.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
    if span.partition("-")[0] != str(have):
        part.unlink()
        raise _Transient(f"the server resumed at {span or '?'} instead of byte {have}; starting over")
    return int(total) if total.isdigit() else None


def check_download(part: Path, url: str, size: int | None, sha256: str | None) -> None:
    """Size and sha256 of a finished .part; a bad file is removed."""
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"{url} gave {got} bytes instead of {size}; the file was removed: run again or pass "
                            f"another --mirror")
    if sha256 is not None and (digest := file_sha256(part)) != sha256:
        part.unlink()
        raise DownloadError(f"sha256 mismatch for {url}: got {digest}, expected {sha256}; the bad file was removed: "
                            f"run again or pass another --mirror")


def verifies(path: Path, size: int | None, sha256: str | None) -> bool:
    return (size is None or path.stat().st_size == size) and (sha256 is None or file_sha256(path) == sha256)


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def human(n: float) -> str:
    """Bytes in decimal units: 191984949 -> '192.0 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


class Progress:
    """Bytes, rate and ETA: one line redrawn in place on a terminal, otherwise a line per 10% (or per minute)."""

    def __init__(self, name: str, start: int, total: int | None):
        self.name, self.start, self.total, self.out = name, start, total, sys.stderr
        self.tty = self.out.isatty()
        self.have, self.t0, self.shown_at = start, time.monotonic(), time.monotonic()
        self.next_tenth = 1 + 10 * start // total if total else None

    def update(self, have: int) -> None:
        now, self.have = time.monotonic(), have
        if self.tty and now - self.shown_at >= 0.2:
            self.show(have, now, "")
        elif not self.tty and (now - self.shown_at >= 60 or (self.total and 10 * have >= self.next_tenth * self.total)):
            self.show(have, now, "\n")
            if self.total:
                self.next_tenth = 1 + 10 * have // self.total

    def show(self, have: int, now: float, end: str) -> None:
        rate = (have - self.start) / max(now - self.t0, 1e-9)
        line = f"  {self.name}  {human(have)}"
        if self.total:
            eta = timedelta(seconds=round((self.total - have) / rate)) if rate > 0 else "?"
            line += f" / {human(self.total)} ({100 * have // self.total}%)  {human(rate)}/s  ETA {eta}"
        else:
            line += f"  {human(rate)}/s"
        print(f"\r{line:79}" if self.tty else line, end=end, file=self.out, flush=True)
        self.shown_at = now

    def close(self) -> None:
        if self.tty:
            self.show(self.have, time.monotonic(), "\n")

# ----------------------------------------------------------------------------------------------------------------------
# Items: plan, fetch, build


def fetch_remote(remote: Remote, root: Path, bases: dict, session: requests.Session) -> Path:
    """A Remote from the first of its source's bases that delivers it."""
    errors = []
    for base in bases[remote.source]:
        try:
            return fetch(url_of(remote, base), root / remote.dest, size=remote.size, sha256=remote.sha256,
                         session=session)
        except DownloadError as err:
            errors.append(err)
            print(f"{err}", file=sys.stderr)
    if len(errors) == 1:
        raise errors[0]
    raise DownloadError(f"every mirror of {remote.path} failed (see above): pass a working one with "
                        f"--mirror {remote.source}=URL")


def is_done(item: Item, root: Path) -> bool:
    return all((root / out).exists() for out in item.outputs)


def get(item: Item, root: Path, bases: dict, session: requests.Session) -> None:
    """Fetch and build an item unless its outputs are there; then validate them."""
    if not is_done(item, root) and item.remotes:
        for remote in item.remotes:
            fetch_remote(remote, root, bases, session)
        if item.build:
            item.build(root)
        for remote in item.remotes:
            if remote.dest not in item.outputs:
                (root / remote.dest).unlink()
    if item.check:
        item.check(root)
    print(f"{item.name}: ok")


def remote_size(session: requests.Session, url: str) -> int | None:
    """Content-Length from a HEAD request (following redirects), or None."""
    try:
        r = session.head(url, allow_redirects=True, timeout=15, headers={"Accept-Encoding": "identity"})
        return int(r.headers["Content-Length"]) if r.ok and "Content-Length" in r.headers else None
    except (requests.RequestException, ValueError):
        return None


def show_plan(items: list[Item], root: Path, bases: dict, session: requests.Session) -> None:
    """What will be fetched, with sizes (published, else from a HEAD request), before anything is."""
    print(f"data directory: {root}")
    total, unknown = 0, 0
    for item in items:
        if is_done(item, root):
            print(f"  {item.name:14} present, skipped")
            continue
        if not item.remotes:
            print(f"  {item.name:14} manual download:\n" + READ_HELP.format(path=root / item.outputs[0]))
        for remote in item.remotes:
            url = url_of(remote, bases[remote.source][0])
            size = remote.size or remote_size(session, url)
            total, unknown = total + (size or 0), unknown + (size is None)
            print(f"  {item.name:14} {url}  {human(size) if size else 'size unknown'}")
    print(f"to fetch: {human(total)}" + (f" + {unknown} files of unknown size" if unknown else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["main"],
                        help=f"what to fetch (default main): {', '.join([*GROUPS, *ITEMS])}")
    parser.add_argument("--data", help="data root (default data, or data/toy with --toy)")
    parser.add_argument("--mirror", action="append", default=[], metavar="NAME=URL",
                        help=f"replace a source's base URL; NAME is one of {', '.join(SOURCES)}")
    parser.add_argument("--dry-run", action="store_true", help="show what would be fetched and stop")
    parser.add_argument("--toy", action="store_true", help="build the offline toy kit (no network)")
    args = parser.parse_args(argv)
    root = Path(args.data or ("data/toy" if args.toy else "data"))
    if args.toy:
        if subprocess.run([sys.executable, str(Path(__file__).with_name("toy.py")), "--data", str(root)]).returncode:
            raise SystemExit("the toy kit was not built: see the error above")
        return
    items, bases, session = expand(args.names), mirror_bases(args.mirror), requests.Session()
    show_plan(items, root, bases, session)
    if args.dry_run:
        return
    failed = []
    for item in items:
        try:
            get(item, root, bases, session)
        except DownloadError as err:
            print(f"{item.name}: {err}", file=sys.stderr)
            failed.append(item.name)
    if failed:
        raise SystemExit(f"not done: {' '.join(failed)}; fix the errors above and run "
                         f"`python download.py {' '.join(failed)}` again")


if __name__ == "__main__":
    main()
