"""The processed dataset every stage reads, its registry of named sources, and its cache.

A `Dataset` is three tables (users, items, interactions; schema in process.py) plus an
`info` dict saying where it came from and what was skipped. Processing is cached as
parquet under a folder keyed by a hash of the input files' bytes and the settings, so a
second load takes well under a second and a changed input never reuses a stale cache.

The cache keeps what the read skipped (malformed lines, a kept truncated prefix) and the
policy flags are checked against it on every load: `--strict` fails on a cache a lenient run
wrote. A truncated prefix kept with `--allow-truncated` was accepted for those exact bytes,
so later stages (which load with default flags) get it too, each time with a warning. A
cache folder appears whole or not at all (filled under a temp name, then renamed), so an
interrupted run or two runs writing the same key never leave one half-written to read back.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from ..paths import REPO_ROOT, cache_root, sha256_file
from .amazon import DataError, item_titles, read_meta, read_reviews
from .process import build_split
from .release import read_release

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# What the readers record about skipped input (info["lines"]); a cache written before they
# recorded truncation is rebuilt once rather than trusted (not part of the fingerprint, so
# the processed data and every stage keyed on it stay the same).
READER_VERSION = 2
TABLES = ("users", "items", "interactions")
# how to read, not what to make: the same processed data either way
POLICY_FIELDS = ("strict", "allow_truncated", "use_cache")


# Named sources under the shared data root: (kind, folder, reviews file, meta file).
SOURCES = {
    "gift-cards": ("amazon", "amazon2018-gift-cards-5core", "Gift_Cards_5.json.gz",
                   "meta_Gift_Cards.json.gz"),
    "magazine": ("amazon", "amazon2018-magazine-subscriptions-5core",
                 "Magazine_Subscriptions_5.json.gz", "meta_Magazine_Subscriptions.json.gz"),
    "all-beauty": ("amazon", "amazon2018-all-beauty-5core", "All_Beauty_5.json.gz", None),
    "games": ("release", "ulmrec-release/games", None, None),
    "beauty": ("release", "ulmrec-release/beauty", None, None),
}
# the two files a release split folder cannot do without (preferences, user index optional)
RELEASE_FILES = ("sequences.jsonl.gz", "items.jsonl.gz")


def data_root() -> Path:
    """ULMREC_DATA (or ULMREC_DATA_ROOT) overrides the default ../shared/data."""
    env = os.environ.get("ULMREC_DATA") or os.environ.get("ULMREC_DATA_ROOT")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"



@dataclass
class DataConfig:
    """Which data to load and how to process it."""
    dataset: str = field(default="gift-cards", metadata={
        "help": f"a name ({', '.join(SOURCES)}) or a folder with Amazon dumps or a release split"})
    reviews: str | None = field(default=None, metadata={"help": "review file (overrides dataset)"})
    meta: str | None = field(default=None, metadata={"help": "meta file to go with --reviews"})
    min_core: int = field(default=5, metadata={"help": "k of the iterative k-core filter"})
    title_fallback: bool = field(default=True, metadata={
        "help": "use brand + description where an item's title is empty or HTML-only"})
    strict: bool = field(default=False, metadata={"help": "stop at the first malformed line"})
    allow_truncated: bool = field(default=False, metadata={
        "help": "keep the lines before the damage of a truncated or corrupt .gz (a warning "
                "says so) instead of stopping"})
    use_cache: bool = field(default=True, metadata={"help": "read/write the parquet cache"})


@dataclass
class Dataset:
    name: str
    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    info: dict = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        """Largest item id; ids run 1..num_items (0 is padding)."""
        return int(self.items["item"].max()) if len(self.items) else 0

    def sequences(self, upto: str = "train") -> pd.Series:
        """user → chronological item list of the splits up to and including `upto`."""
        keep = {"train": ["train"], "val": ["train", "val"], "test": ["train", "val", "test"]}
        df = self.interactions[self.interactions["split"].isin(keep[upto])]
        return df.sort_values(["user", "position"]).groupby("user")["item"].agg(list)

    def targets(self, split: str) -> pd.Series:
        """user → the held-out item of `split` ('val' or 'test')."""
        df = self.interactions[self.interactions["split"] == split]
        return df.set_index("user")["item"].sort_index()

    def stats(self) -> dict:
        n_u = self.interactions["user"].nunique()
        n_i = self.interactions["item"].nunique()
        n = len(self.interactions)
        return {"dataset": self.name, "users": n_u, "items": n_i, "interactions": n,
                "avg_length": n / n_u if n_u else 0.0,
                "sparsity": 1.0 - n / (n_u * n_i) if n_u and n_i else 1.0}


def resolve_source(cfg: DataConfig) -> tuple[str, str, dict[str, Path | None]]:
    """(name, kind, files) for a config: a named source, a folder, or explicit files."""
    if cfg.reviews:
        files = {"reviews": Path(cfg.reviews), "meta": Path(cfg.meta) if cfg.meta else None}
        return Path(cfg.reviews).name.split(".")[0], "amazon", files
    if cfg.dataset in SOURCES:
        kind, folder, reviews, meta = SOURCES[cfg.dataset]
        base = data_root() / folder
        if kind == "release":
            return cfg.dataset, kind, {"folder": base}
        return cfg.dataset, kind, {"reviews": base / reviews, "meta": base / meta if meta else None}
    folder = Path(cfg.dataset)
    if not folder.is_dir():
        raise DataError(f"unknown dataset '{cfg.dataset}': not one of {', '.join(SOURCES)} "
                        f"and not a folder")
    if any((folder / f).exists() for f in RELEASE_FILES):
        return folder.name, "release", {"folder": folder}
    reviews = sorted(p for p in folder.iterdir()
                     if p.name.startswith("reviews_") or "_5.json" in p.name)
    metas = sorted(p for p in folder.iterdir() if p.name.startswith("meta_"))
    if not reviews:
        raise DataError(f"{folder}: no review file (reviews_<Cat>_5.json[.gz] or <Cat>_5.json[.gz])")
    if not metas:  # without titles no item survives: say so now, not as "no users left"
        raise DataError(f"{folder}: {reviews[0].name} but no meta file (meta_<Cat>.json[.gz]); "
                        f"items take their titles from it")
    return folder.name, "amazon", {"reviews": reviews[0], "meta": metas[0]}


def _input_files(kind: str, files: dict) -> list[Path]:
    if kind == "release":
        folder = files["folder"]
        missing = [f for f in RELEASE_FILES if not (folder / f).exists()]
        if missing:
            raise DataError(f"{folder}: {' and '.join(missing)} not found (a release split "
                            f"folder has {' and '.join(RELEASE_FILES)})")
        return sorted(p for p in folder.iterdir() if p.name.endswith((".gz", ".jsonl", ".json")))
    out = [files["reviews"]] + ([files["meta"]] if files["meta"] else [])
    for p in out:
        if not p.exists():
            raise DataError(f"{p}: file not found")
    return out


def fingerprint(cfg: DataConfig, kind: str, files: dict) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in POLICY_FIELDS}
    settings.update(kind=kind, schema=SCHEMA_VERSION, dataset=None, reviews=None, meta=None)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in _input_files(kind, files):
        h.update(p.name.encode() + sha256_file(p).encode())
    return h.hexdigest()[:16]


def load_dataset(cfg: DataConfig | str) -> Dataset:
    """Load (from cache when current) and process a dataset; raise DataError on bad input."""
    if isinstance(cfg, str):
        cfg = DataConfig(dataset=cfg)
    name, kind, files = resolve_source(cfg)
    key = fingerprint(cfg, kind, files)
    cache_dir = cache_root() / "data" / f"{name}-{key}"
    cached = _read_cache(name, cache_dir) if cfg.use_cache else None
    if cached is not None:
        check_policy(cached.info, cfg)
        log.info("%s: loaded cached processed data from %s", name, cache_dir)
        return cached

    if kind == "release":
        users, items, inter, reports = read_release(files["folder"], cfg.strict, cfg.allow_truncated)
        counts: dict = {}
    else:
        reviews, rev_report = read_reviews(files["reviews"], cfg.strict, cfg.allow_truncated)
        reports = {"reviews": rev_report}
        if files["meta"] is not None:
            meta, reports["meta"] = read_meta(files["meta"], cfg.strict, cfg.allow_truncated)
        else:
            meta = pd.DataFrame(columns=["asin", "title", "description", "category", "brand"])
        titled = item_titles(meta, fallback=cfg.title_fallback)
        _check_titles(files, meta, titled, reviews, cfg)
        users, items, inter, counts = build_split(reviews, titled, cfg.min_core)
        counts["reviewed_items"] = int(reviews["asin"].nunique())
        has_title = reviews["asin"].isin(titled["asin"])
        counts["reviewed_items_with_title"] = int(reviews.loc[has_title, "asin"].nunique())
        counts["title_fallbacks"] = int((items["title_source"] == "fallback").sum())
        if files["meta"] is None:
            counts["note"] = "no meta file: no item has a title"

    if inter.empty:
        why = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise DataError(f"{name}: no users left after filtering ({why})")

    info = {
        "name": name, "kind": kind, "fingerprint": key, "schema": SCHEMA_VERSION,
        "reader": READER_VERSION,
        "files": {k: str(v) for k, v in files.items() if v is not None},
        "settings": asdict(cfg),
        "text_kind": sorted(inter["text_kind"].unique().tolist()),
        "counts": counts,
        "lines": {k: {"read": r.lines, "kept": r.kept, "malformed": len(r.issues),
                      "first_issues": [str(i) for i in r.issues[:20]], "truncated": r.truncated}
                  for k, r in reports.items()},
    }
    for what, r in reports.items():
        if r.issues or r.truncated:
            log.warning("%s", r.summary(f"{name} {what}"))
    ds = Dataset(name, users, items, inter, info)
    if cfg.use_cache:
        _write_cache(ds, cache_dir)
    return ds


def _check_titles(files: dict, meta: pd.DataFrame, titled: pd.DataFrame, reviews: pd.DataFrame,
                  cfg: DataConfig) -> None:
    """A meta file that gives no reviewed item a title is a wrong file, not a small dataset."""
    if files["meta"] is None:
        return
    if titled.empty:
        how = ("nor brand + description to fall back on" if cfg.title_fallback
               else "and --no-title-fallback is set")
        raise DataError(f"{files['meta']}: none of its {len(meta):,} items has a usable title ({how})")
    if not reviews["asin"].isin(titled["asin"]).any():
        raise DataError(f"{files['meta']}: none of the {reviews['asin'].nunique():,} items reviewed "
                        f"in {files['reviews']} is in it (meta from another category?)")


def check_policy(info: dict, cfg: DataConfig) -> None:
    """Apply --strict to what the read behind `info` skipped (a cache written by a lenient run
    must not let a strict one pass), and say again that a truncated prefix is all there is."""
    for rep in info["lines"].values():
        if rep.get("truncated") and cfg.strict:
            raise DataError(f"{rep['truncated']} (--strict: this cache kept only the "
                            f"{rep['read']:,} lines before the damage, under --allow-truncated)")
        if rep.get("truncated"):
            # accepted for these bytes by an --allow-truncated run; stages after it load
            # with default flags and must get the same data, but never quietly
            log.warning("TRUNCATED INPUT %s: using only the %s lines before the damage "
                        "(accepted with --allow-truncated)", rep["truncated"], f"{rep['read']:,}")
        if cfg.strict and rep["malformed"]:
            raise DataError(f"{rep['first_issues'][0]} (--strict: the cached data skipped "
                            f"{rep['malformed']:,} malformed line(s))")


def _write_cache(ds: Dataset, cache_dir: Path) -> None:
    """Fill a temp folder, then rename it into place: never a half-written cache folder, even
    on Ctrl-C (the temp folder goes) or kill -9 (it stays, under a name nothing reads)."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".", suffix=".tmp", dir=cache_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        for table in TABLES:
            getattr(ds, table).to_parquet(tmp / f"{table}.parquet", index=False)
        (tmp / "info.json").write_text(json.dumps(ds.info, indent=1, default=str))
        _publish(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`. The same key means the same data, so when another run got
    there first its folder stands and ours goes; only a stale folder (older reader, incomplete)
    is moved aside, so a current one another run may be reading is left alone."""
    for _ in range(5):
        try:
            os.rename(tmp, target)  # atomic; fails while target is a non-empty folder
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _cached_info(target) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".stale", dir=target.parent))
        try:
            os.replace(target, aside)  # onto an empty folder: allowed
        except FileNotFoundError:  # another run moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"{target}: could not replace the cache folder (other runs keep writing it)")


def _cached_info(cache_dir: Path) -> dict | None:
    """info of a complete cache written by this reader version; None means rebuild."""
    try:
        info = json.loads((cache_dir / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("reader") != READER_VERSION:
        return None
    if not all((cache_dir / f"{t}.parquet").is_file() for t in TABLES):
        return None
    return info


def _read_cache(name: str, cache_dir: Path) -> Dataset | None:
    info = _cached_info(cache_dir)
    if info is None:
        return None
    try:
        tables = {t: pd.read_parquet(cache_dir / f"{t}.parquet") for t in TABLES}
    except (OSError, ValueError) as e:  # damaged by hand, or replaced under us: rebuild
        log.warning("%s: unreadable cache %s (%s): rebuilding it", name, cache_dir, e)
        return None
    info["from_cache"] = str(cache_dir)
    return Dataset(name, info=info, **tables)
