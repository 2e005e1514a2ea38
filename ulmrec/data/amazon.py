"""Readers for Amazon review dumps as distributed (McAuley lab, 2014 and 2018 releases).

2014: reviews_<Cat>_5.json.gz (JSON lines), meta_<Cat>.json.gz (one *Python dict literal*
a line, parsed with ast.literal_eval, never eval). 2018: <Cat>_5.json.gz and
meta_<Cat>.json.gz, both JSON lines. Files may be gzipped or plain.

Bad input never passes as good data. A bad *line* (not JSON, not UTF-8, a missing field)
becomes a `LineIssue` (file, line, column, excerpt): skipped and counted by default, fatal in
strict mode. A bad *file* is a `DataError`: missing, empty, no usable line at all, or a
truncated / corrupt gzip archive. The latter would otherwise look like one bad last line
while losing everything after it; `allow_truncated` keeps the records before the damage,
and the report says so.
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import logging
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad or unusable input data; the message names the file (and line) at fault."""


@dataclass
class LineIssue:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ReadReport:
    """What happened while reading: lines read/kept, every skipped line, and whether the
    file ended early (`truncated`: why, set only when allow_truncated kept the prefix)."""
    lines: int = 0
    kept: int = 0
    issues: list[LineIssue] = field(default_factory=list)
    truncated: str | None = None

    def summary(self, what: str) -> str:
        s = f"{what}: {self.kept:,} of {self.lines:,} lines kept"
        if self.issues:
            s += f", {len(self.issues):,} malformed skipped (first: {self.issues[0]})"
        if self.truncated:
            s += f"; TRUNCATED: {self.truncated}"
        return s


def _open_binary(path: Path):
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def read_text(path: Path) -> str:
    """A whole one-document file (gzipped or plain) as UTF-8 text; damage is a DataError."""
    with _open_binary(path) as fh:
        try:
            data = fh.read()
        except ARCHIVE_ERRORS as err:
            raise DataError(f"{path}: {archive_error(err)}") from None
    try:
        return data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte 0x{data[err.start]:02x} at offset "
                        f"{err.start:,})") from None


# EOFError: the archive ends mid-stream; BadGzipFile (an OSError): bad header or CRC;
# zlib.error: damaged deflate data.
ARCHIVE_ERRORS = (EOFError, OSError, zlib.error)


def archive_error(err: Exception) -> str:
    return f"truncated or corrupt gzip archive ({type(err).__name__}: {err})"


def _excerpt(text: str, pos: int, width: int = 24) -> str:
    """A short, quoted piece of `text` around `pos`; control characters made visible."""
    lo, hi = max(0, pos - width), min(len(text), pos + width)
    piece = ("…" if lo else "") + text[lo:hi] + ("…" if hi < len(text) else "")
    return json.dumps(piece, ensure_ascii=False)


def _parse_record(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as json_err:
        # 2014 meta files hold Python literals ('single quotes', True/False)
        try:
            with warnings.catch_warnings():  # garbage lines would print "invalid decimal literal"
                warnings.simplefilter("ignore", SyntaxWarning)
                obj = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            # json's own msg ends in a dangling "at" ("Invalid control character at"): say where
            what = json_err.msg.removesuffix(" at")
            raise ValueError(f"not JSON nor a Python literal: {what} at column {json_err.colno}, "
                             f"near {_excerpt(text, json_err.pos)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    return obj


def _decode(raw: bytes, lineno: int) -> str:
    if lineno == 1:
        raw = raw.removeprefix(BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        raise ValueError(f"not UTF-8: byte 0x{raw[err.start]:02x} at byte {err.start + 1}, "
                         f"near {_excerpt(text, err.start)}") from None


def iter_records(path: Path, report: ReadReport, strict: bool = False,
                 allow_truncated: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each well-formed line; record issues for the rest.

    A damaged gzip archive raises DataError (naming the file and the last good line) unless
    allow_truncated, which keeps what came before, loudly; strict stops there regardless.
    """
    lineno = 0
    with _open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                report.lines += 1
                try:
                    yield lineno, _parse_record(_decode(raw, lineno))
                except ValueError as err:
                    _issue(report, LineIssue(str(path), lineno, str(err)), strict)
        except ARCHIVE_ERRORS as err:
            where = f"after line {lineno:,}" if lineno else "before its first line"
            why = f"{path}: {archive_error(err)} {where}"
            if strict or not allow_truncated:
                raise DataError(f"{why}; the file is damaged: re-download it, or pass "
                                f"--allow-truncated to keep the {report.lines:,} lines before "
                                f"the damage") from None
            report.truncated = why
            log.warning("TRUNCATED INPUT %s: keeping only the %s lines before the damage",
                        why, f"{report.lines:,}")


def require_records(path: Path, report: ReadReport) -> None:
    """A file with no usable record is a bad file, not a file of bad lines."""
    if report.lines == 0:
        raise DataError(f"{path}: empty file (no records)"
                        + (f"; {report.truncated}" if report.truncated else ""))
    if report.kept == 0:
        first = f" (first: {report.issues[0]})" if report.issues else ""
        raise DataError(f"{path}: none of its {report.lines:,} lines is a usable record{first}")


def _issue(report: ReadReport, issue: LineIssue, strict: bool) -> None:
    if strict:
        raise DataError(str(issue))
    report.issues.append(issue)


def read_reviews(path: Path, strict: bool = False, allow_truncated: bool = False
                 ) -> tuple[pd.DataFrame, ReadReport]:
    """Reviews as a DataFrame: reviewerID, asin, rating, timestamp, summary, review_text, line."""
    report = ReadReport()
    rows = []
    for lineno, rec in iter_records(path, report, strict, allow_truncated):
        try:
            row = _review_row(rec)
        except (KeyError, TypeError, ValueError) as err:
            _issue(report, LineIssue(str(path), lineno, f"bad review record: {err}"), strict)
            continue
        row["line"] = lineno
        rows.append(row)
        report.kept += 1
    require_records(path, report)
    cols = ["reviewerID", "asin", "rating", "timestamp", "summary", "review_text", "line"]
    return pd.DataFrame(rows, columns=cols), report


def _review_row(rec: dict) -> dict:
    for key in ("reviewerID", "asin", "overall", "unixReviewTime"):
        if key not in rec or rec[key] in (None, ""):
            raise KeyError(f"missing field '{key}'")
    rating = float(rec["overall"])
    if not 0.0 <= rating <= 5.0:
        raise ValueError(f"field 'overall' out of range: {rec['overall']!r}")
    return {
        "reviewerID": str(rec["reviewerID"]),
        "asin": str(rec["asin"]),
        "rating": rating,
        "timestamp": int(rec["unixReviewTime"]),
        "summary": _clean_text(rec.get("summary")),
        "review_text": _clean_text(rec.get("reviewText")),
    }


_TAG = re.compile(r"<[^>]*>?")
_SPACE = re.compile(r"\s+")


def _clean_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    return _SPACE.sub(" ", html.unescape(str(value))).strip()


def clean_title(raw) -> str:
    """Unescape HTML and strip tags; an HTML-only fragment becomes ''."""
    text = _TAG.sub(" ", html.unescape(str(raw or "")))
    return _SPACE.sub(" ", text).strip()


def _first_sentence(text: str, limit: int = 100) -> str:
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rsplit(" ", 1)[0] + "…"


def read_meta(path: Path, strict: bool = False, allow_truncated: bool = False
              ) -> tuple[pd.DataFrame, ReadReport]:
    """Item metadata: asin, title, description, category, brand, line."""
    report = ReadReport()
    rows = []
    for lineno, rec in iter_records(path, report, strict, allow_truncated):
        if not rec.get("asin"):
            _issue(report, LineIssue(str(path), lineno, "bad meta record: missing field 'asin'"),
                   strict)
            continue
        cats = rec.get("category") or rec.get("categories") or []
        if cats and isinstance(cats[0], list):  # 2014: list of category paths
            cats = cats[0]
        rows.append({
            "asin": str(rec["asin"]),
            "title": clean_title(rec.get("title")),
            "description": clean_title(_clean_text(rec.get("description"))),
            "category": " > ".join(clean_title(c) for c in cats if c),
            "brand": clean_title(rec.get("brand")),
            "line": lineno,
        })
        report.kept += 1
    require_records(path, report)
    cols = ["asin", "title", "description", "category", "brand", "line"]
    meta = pd.DataFrame(rows, columns=cols).drop_duplicates("asin", keep="first")
    return meta, report


def item_titles(meta: pd.DataFrame, fallback: bool = True) -> pd.DataFrame:
    """Choose each item's display title: its own title, else (optionally) brand + description.

    Returns asin, title, title_source ('title' | 'fallback'), description, category, brand;
    items with no usable text are left out.
    """
    meta = meta.copy()
    meta["title_source"] = "title"
    missing = meta["title"] == ""
    if fallback:
        desc = meta["description"].map(_first_sentence)
        alt = (meta["brand"] + ": " + desc).str.strip(": ")
        meta.loc[missing, "title"] = alt[missing]
        meta.loc[missing, "title_source"] = "fallback"
    usable = meta["title"] != ""
    return meta.loc[usable, ["asin", "title", "title_source", "description", "category", "brand"]]
