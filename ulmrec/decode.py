"""Index → preference decoding (task 2, paper §5.4.4) and how well it reads the user back.

Three parts, used by the bundle (`Bundle.decode_many`), the app's ladder and `bench.decode`:

* generation: greedy (deterministic), one batched left-padded `generate` per chunk of
  distinct prompts, the index's own evidence amplified against the same prompt without an
  index (`IndexContrast`), repetition control on the *generated* tokens only (the prompt's
  words, "user", "preferences", are not penalised), and a per-row stop once `max_sentences`
  sentences are complete;
* post-processing: markdown and list markers stripped, a leading "User preferences:" label
  dropped, whitespace collapsed, and the text trimmed to its last complete sentence, so a
  page never shows a sentence cut by the token budget (a budget that ends before any
  sentence completes shows the fragment ending in "…");
* measurement (pure numpy, no model): own-preference retrieval (the decoded text's cosine
  to the user's reference preference vs other users'), prefix fidelity (to the centroid of
  the references of the users sharing the prefix vs other prefixes' centroids) and
  diversity (distinct outputs, boilerplate share) and invented names (`CatalogueNames`: a
  title-like name that no catalogue title contains).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from .model import cache_kw, index_vocabulary
from .prompts import INSTRUCTIONS, render, sentence_ends

# transformers (_processors, IndexContrast) and sklearn (catalogue_vocab) are imported on first
# use: they cost ~2 s and ~2.5 s to import, and the post-processing and measurement never need them

# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class DecodeSettings:
    """How an index is decoded. The defaults are the app's and the benchmark's."""
    max_new_tokens: int = 48
    no_repeat_ngram_size: int = 3      # within the generated text (0 = off)
    repetition_penalty: float = 1.15   # on tokens already generated (1 = off)
    max_sentences: int = 2             # stop a row once this many sentences are complete
    batch_size: int = 32
    # index contrast (0 = off): log p(y | index) + w·(log p(y | index) − log p(y | no index)),
    # over the tokens with p(y | index) ≥ plausibility × the best one (contrastive decoding):
    # words the index makes likelier win over what any user's text would say. w = 1 chosen
    # on 150 validation-sampled games users (docs/decode.md); it doubles the decoding cost
    contrast: float = 1.0
    plausibility: float = 0.1

    def __post_init__(self):
        if self.contrast < 0:
            raise ValueError(f"contrast must be ≥ 0 (0 = plain greedy), got {self.contrast}")
        if not 0 < self.plausibility <= 1:
            raise ValueError(f"plausibility must be in (0, 1], got {self.plausibility}")


INDEX_INPUT = "User index: {index}"   # the input line of index_to_pref (ulmrec.tasks)


def index_prompt(index: str, tokenizer, fmt: str = "chat") -> str:
    """The evaluation prompt of index_to_pref for an index or a prefix of it."""
    return render(INSTRUCTIONS["index_to_pref"][0], INDEX_INPUT.format(index=index), tokenizer, fmt)


# ------------------------------------------------------------------ post-processing

_LABEL = re.compile(r"^\s*(?:the\s+)?(?:user(?:'s)?\s+)?(?:preferences?|preference statement)\s*:\s*",
                    re.IGNORECASE)


def strip_markdown(text: str) -> str:
    """Plain text from a model's markdown: no emphasis, headings, code, list markers, links;
    list items and lines joined into one paragraph."""
    text = text.replace("\r", "")
    text = re.sub(r"```.*?(```|$)", " ", text, flags=re.DOTALL)          # code blocks
    text = re.sub(r"`([^`]*)`", r"\1", text)                              # inline code
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)                # links, images
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)                       # bold
    text = re.sub(r"(?<![\w*])[*_](?!\s)(.+?)(?<!\s)[*_](?![\w*])", r"\1", text)  # italics
    lines = []
    for line in text.split("\n"):
        heading = re.match(r"^\s{0,3}#{1,6}\s*", line)
        line = line[heading.end():] if heading else line                  # headings
        line = re.sub(r"^\s*(?:[-*+•]|\d{1,2}[.)])(?:\s+|$)", "", line)   # list markers
        line = re.sub(r"^\s*>\s?", "", line)                              # quotes
        line = line.replace("**", "").replace("__", "").strip()
        if not line or re.fullmatch(r"[-*_=|: ]{3,}", line):            # rules, table lines
            continue
        # a list item or heading without end punctuation becomes its own clause
        if lines and not re.search(r"[.!?:;,…]$", lines[-1]):
            lines[-1] += ";" if not lines[-1].endswith(":") else ""
        if heading and not re.search(r"[.!?:;,…]$", line):
            line += ":"                                                   # a heading labels
        lines.append(line)
    text = " ".join(lines)
    text = text.replace("*", "")
    return re.sub(r"\s+", " ", text).strip()


def trim_sentences(text: str, max_sentences: int = 0, finished: bool = False) -> str:
    """`text` cut after its last complete sentence (at most `max_sentences`, 0 = no limit).

    `finished` says the model ended the text itself (EOS): an unpunctuated text is then
    whole and gets a full stop. Text the token budget cut keeps its complete sentences
    only; with none, the fragment is shown ending in '…' so it reads as cut.
    """
    text = text.strip()
    if not text:
        return ""
    ends = sentence_ends(text)
    if max_sentences and len(ends) > max_sentences:
        ends = ends[:max_sentences]
    if ends:
        rest = text[ends[-1]:].strip()
        if finished and rest and not (max_sentences and len(ends) >= max_sentences) and \
                len(rest.split()) >= 3:
            return text[: ends[-1]] + " " + rest.rstrip(",;:") + "."
        return text[: ends[-1]].strip()
    text = text.rstrip(",;: -")
    return text + "." if finished else text + "…"


def clean_decoded(raw: str, finished: bool = False, max_sentences: int = 0) -> str:
    """What the app shows for a raw generation: plain text, whole sentences."""
    text = strip_markdown(raw)
    text = _LABEL.sub("", text, count=1)
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    return trim_sentences(text, max_sentences, finished)


# ------------------------------------------------------------------ generation

def _punct_token_ids(tokenizer) -> frozenset[int]:
    """Ids of tokens whose text holds a sentence-ending mark (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_ulmrec_punct_ids", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        cached = frozenset(i for t, i in vocab.items()
                           if any(c in tokenizer.convert_tokens_to_string([t]) for c in ".!?…"))
        try:
            tokenizer._ulmrec_punct_ids = cached
        except AttributeError:
            pass
    return cached


def _processors(start: int, ngram: int, penalty: float, tokenizer, max_sentences: int,
                contrast=None):
    """(logits processors, stopping criteria) that look at generated tokens only; `contrast`
    (an IndexContrast) goes first, on the model's own logits."""
    from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                              StoppingCriteriaList)

    class GeneratedRepetition(LogitsProcessor):
        def __call__(self, input_ids, scores):
            gen = input_ids[:, start:]
            if gen.shape[1] == 0:
                return scores
            if penalty != 1.0:
                got = torch.gather(scores, 1, gen)
                scores = scores.scatter(1, gen, torch.where(got < 0, got * penalty, got / penalty))
            if ngram and gen.shape[1] >= ngram - 1:
                rows = gen.tolist()
                for r, toks in enumerate(rows):
                    key = tuple(toks[len(toks) - ngram + 1:]) if ngram > 1 else ()
                    banned = [toks[i + ngram - 1] for i in range(len(toks) - ngram + 1)
                              if tuple(toks[i:i + ngram - 1]) == key]
                    if banned:
                        scores[r, banned] = -float("inf")
            return scores

    index_ids = _index_token_ids(tokenizer)

    class NoIndexTokens(LogitsProcessor):
        # a preference is words: an index-token row that starts near its users' words
        # (index_init 'words') must not be written in their place
        def __call__(self, input_ids, scores):
            if index_ids:
                scores[:, index_ids] = -float("inf")
            return scores

    punct = _punct_token_ids(tokenizer)

    class SentenceStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if not max_sentences or input_ids.shape[1] <= start:
                return done
            last = input_ids[:, -1].tolist()
            for r, tok in enumerate(last):
                if tok in punct:
                    text = tokenizer.decode(input_ids[r, start:], skip_special_tokens=True)
                    done[r] = len(sentence_ends(strip_markdown(text))) >= max_sentences
            return done

    procs = [GeneratedRepetition(), NoIndexTokens()]
    return (LogitsProcessorList(([contrast] if contrast is not None else []) + procs),
            StoppingCriteriaList([SentenceStop()]))


class IndexContrast:
    """A logits processor: the next-token log-probabilities given the index, pushed away from
    those given the same prompt with no index (one shared prompt, so that branch needs no
    padding; its own KV cache follows the generated tokens). Tokens below `plausibility` ×
    the best conditional probability are dropped, so the contrast only re-orders tokens the
    index itself finds plausible (Li et al. 2023)."""

    def __init__(self, model, negative_ids, start: int, weight: float, plausibility: float):
        self.model, self.negative, self.start = model, negative_ids, start   # negative [1, L]
        self.weight, self.alpha, self.cache = weight, plausibility, None

    def __call__(self, input_ids, scores):
        from transformers import DynamicCache

        gen = input_ids[:, self.start:]                                  # [B, t]
        if self.cache is None:
            ids = torch.cat([self.negative.expand(len(gen), -1), gen], dim=1)
            self.cache = DynamicCache(config=self.model.config)
        else:
            ids = gen[:, -1:]
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                             **{cache_kw(self.model): self.cache})
        uncond = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)    # [B, V]
        cond = torch.log_softmax(scores.float(), dim=-1)
        mixed = cond + self.weight * (cond - uncond)
        floor = cond.max(dim=-1, keepdim=True).values + math.log(self.alpha)
        return mixed.masked_fill(cond < floor, -float("inf")).to(scores.dtype)


def _index_token_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_added_vocab()
    return [vocab[t] for t in index_vocabulary() if t in vocab]


def generate_raw(model, tokenizer, prompts: list[str], settings: DecodeSettings,
                 add_special_tokens: bool = False, negative_prompt: str | None = None
                 ) -> list[tuple[str, bool]]:
    """(raw text, finished by the model or the sentence stop) per prompt; each distinct
    prompt generated once, in chunks of similar length (left padding). With
    settings.contrast, `negative_prompt` is the prompt the index is contrasted against."""
    unique = list(dict.fromkeys(prompts))
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in unique]
    order = sorted(range(len(unique)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: dict[str, tuple[str, bool]] = {}
    negative = None
    if settings.contrast and negative_prompt is not None:
        negative = tokenizer(negative_prompt, add_special_tokens=add_special_tokens,
                             return_tensors="pt")["input_ids"].to(device)
    for s in range(0, len(order), max(1, settings.batch_size)):
        chunk = [unique[i] for i in order[s:s + settings.batch_size]]
        enc = tokenizer(chunk, add_special_tokens=add_special_tokens, return_tensors="pt",
                        padding=True, padding_side="left").to(device)
        start = enc["input_ids"].shape[1]
        contrast = None if negative is None else \
            IndexContrast(model, negative, start, settings.contrast, settings.plausibility)
        procs, stops = _processors(start, settings.no_repeat_ngram_size,
                                   settings.repetition_penalty, tokenizer, settings.max_sentences,
                                   contrast)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=pad, logits_processor=procs,
                                 stopping_criteria=stops)
        for prompt, g in zip(chunk, gen):
            new = g[start:].tolist()
            text = tokenizer.decode(new, skip_special_tokens=True)
            finished = eos in new or pad in new or \
                (settings.max_sentences > 0 and
                 len(sentence_ends(strip_markdown(text))) >= settings.max_sentences)
            out[prompt] = (text, finished)
    return [out[p] for p in prompts]


def decode_indices(model, tokenizer, indices: list[str], fmt: str = "chat",
                   settings: DecodeSettings | None = None, raw: bool = False) -> list[str]:
    """Index strings (full indices or prefixes) → display-ready preference texts."""
    settings = settings or DecodeSettings()
    prompts = [index_prompt(i, tokenizer, fmt) for i in indices]
    special = fmt == "alpaca"
    gens = generate_raw(model, tokenizer, prompts, settings, add_special_tokens=special,
                        negative_prompt=index_prompt("", tokenizer, fmt))
    # contrast can drift into fragments on a weak adapter: a text that never completed a
    # sentence is written again plainly (greedy, no contrast) rather than shown cut
    redo = [k for k, (t, f) in enumerate(gens)
            if settings.contrast and not f and not sentence_ends(strip_markdown(t))]
    if redo:
        plain = generate_raw(model, tokenizer, [prompts[k] for k in redo],
                             replace(settings, contrast=0.0), add_special_tokens=special)
        for k, g in zip(redo, plain):
            gens[k] = g
    if raw:
        return [t for t, _ in gens]
    return [clean_decoded(t, f, settings.max_sentences) for t, f in gens]


# ------------------------------------------------------------------ measurement

def rank_of_own(own: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Rank of the own score among [own, others...] per row, ties counted against it
    (an output that cannot tell its user from another earns no credit for the tie).
    own [N], others [N, K] → ranks [N] in 1..K+1."""
    own = np.asarray(own, dtype=np.float64)[:, None]
    others = np.asarray(others, dtype=np.float64)
    return 1 + (others >= own - 1e-9).sum(axis=1)


def retrieval_metrics(ranks: np.ndarray, prefix: str = "own") -> dict:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {f"{prefix}_mrr": float("nan"), f"{prefix}_hit1": float("nan"),
                f"{prefix}_hit10": float("nan")}
    return {f"{prefix}_mrr": float((1.0 / ranks).mean()),
            f"{prefix}_hit1": float((ranks <= 1).mean()),
            f"{prefix}_hit10": float((ranks <= 10).mean())}


def sample_negatives(n_pool: int, exclude: np.ndarray, k: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """Per row i, k distinct pool positions ≠ exclude[i] (fewer when the pool is small:
    rows are padded with -1)."""
    k_eff = min(k, n_pool - 1)
    out = np.full((len(exclude), k), -1, dtype=np.int64)
    for i, ex in enumerate(exclude):
        pick = rng.choice(n_pool - 1, size=k_eff, replace=False)
        pick[pick >= ex] += 1          # skip the excluded position
        out[i, :k_eff] = pick
    return out


def own_retrieval(outputs: np.ndarray, refs: np.ndarray, own: np.ndarray,
                  negatives: np.ndarray) -> dict:
    """outputs [N, D] (unit) decoded texts; refs [M, D] (unit) reference preferences;
    own [N] row of each user's reference in refs; negatives [N, K] rows of other users'."""
    own_s = np.einsum("nd,nd->n", outputs, refs[own])
    neg_s = np.einsum("nd,nkd->nk", outputs, refs[np.maximum(negatives, 0)])
    neg_s[negatives < 0] = -np.inf
    return retrieval_metrics(rank_of_own(own_s, neg_s))


def centroids(refs: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group keys, unit centroid per key) of the rows of refs grouped by `groups` [M]."""
    keys, inv = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(keys), refs.shape[1]))
    np.add.at(sums, inv, refs)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return keys, sums / np.maximum(norms, 1e-12)


def prefix_fidelity(outputs: np.ndarray, cents: np.ndarray, mine: np.ndarray,
                    negatives: np.ndarray) -> dict:
    """Accuracy of the own prefix's centroid being the closest among [own, K others]:
    outputs [N, D], cents [P, D], mine [N] centroid row, negatives [N, K] (-1 = none)."""
    ranks = rank_of_own(np.einsum("nd,nd->n", outputs, cents[mine]),
                        np.where(negatives >= 0, np.einsum("nd,nkd->nk", outputs,
                                                           cents[np.maximum(negatives, 0)]), -np.inf))
    n_cand = 1 + (negatives >= 0).sum(axis=1)
    return {"accuracy": float((ranks == 1).mean()) if len(ranks) else float("nan"),
            "mrr": float((1.0 / ranks).mean()) if len(ranks) else float("nan"),
            "chance": float((1.0 / n_cand).mean()) if len(ranks) else float("nan")}


_WORD = re.compile(r"[a-z][a-z0-9'&+-]*[a-z0-9]")


def catalogue_vocab(titles, extra_stop: set[str] | None = None) -> set[str]:
    """Content words (≥ 3 letters, no stopword) of the catalogue's titles (and categories)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    stop = set(ENGLISH_STOP_WORDS) | (extra_stop or set())
    vocab: set[str] = set()
    for t in titles:
        vocab.update(w for w in _WORD.findall(str(t).lower()) if len(w) >= 3 and w not in stop)
    return vocab


# A name in a text: a run of capitalised words (numbers may follow one: "Mario Kart 8"); a
# word that ends a sentence ends the run
_NAME = re.compile(r"[A-Z][\w'’&+-]*(?:\s+[A-Z0-9][\w'’&+-]*)*")
_PIECE = re.compile(r"[a-z0-9]+")
_ACRONYM = re.compile(r"^[A-Z0-9]{2,5}s?$")     # RPG, FPS, PS3, MMOs: kinds of games, not titles


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text.lower().replace("'s", "").replace("’s", ""))


class CatalogueNames:
    """Which names in a decoded text the catalogue does not have.

    A name is a run of capitalised words. Its pieces that are plain words ("Prefers" at a
    sentence's start, the "themed" of "Mario-themed": words the `ordinary` texts write in lower
    case at least `min_count` times, or stop words) and acronyms (RPG, PS3: kinds, not titles)
    are dropped from both ends; what is left is known when it appears, in order and
    contiguous, in some catalogue title or category ("Zelda", "Nintendo DS", "Resident Evil"),
    a plural on its last word forgiven. Anything else names a title the catalogue does not
    have ("Pirate Meerkat"). An invented name made only of plain words ("Space Adventure") is
    not caught: the check errs towards not accusing.
    """

    def __init__(self, titles, ordinary=(), min_count: int = 3, max_n: int = 8):
        from collections import Counter

        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        lower = Counter(w for t in ordinary for w in re.findall(r"\b[a-z][a-z0-9]*", str(t)))
        self.plain = set(ENGLISH_STOP_WORDS) | {"user", "users"} | {
            w for w, c in lower.items() if c >= min_count}
        self.max_n = max_n
        self.grams: set[tuple[str, ...]] = set()
        for t in titles:
            w = _pieces(str(t))
            for n in range(1, max_n + 1):
                self.grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))

    def _known(self, words: list[str]) -> bool:
        if len(words) > self.max_n:
            return all(self._known(words[i:i + self.max_n])
                       for i in range(len(words) - self.max_n + 1))
        last = words[-1][:-1] if words[-1].endswith("s") else words[-1] + "s"
        return tuple(words) in self.grams or (*words[:-1], last) in self.grams

    def unknown(self, text: str) -> list[str]:
        """The names in `text` that no catalogue title or category contains."""
        out = []
        for m in _NAME.finditer(text):
            pieces = [(p, bool(_ACRONYM.match(tok))) for tok in m.group(0).split()
                      for p in _pieces(tok)]
            keep = [not acr and p not in self.plain for p, acr in pieces]
            if not any(keep):
                continue
            first, last = keep.index(True), len(keep) - keep[::-1].index(True)
            words = [p for p, _ in pieces[first:last]]
            if not self._known(words):
                out.append(" ".join(words))
        return out

    def share(self, texts: list[str]) -> float:
        """Share of texts that name at least one name the catalogue does not have."""
        return float(np.mean([bool(self.unknown(t)) for t in texts])) if texts else float("nan")


def diversity(texts: list[str], vocab: set[str]) -> dict:
    """distinct_ratio = distinct outputs / outputs; boilerplate_share = share of outputs with
    no catalogue word, or whose text another output repeats exactly (empty counts too)."""
    if not texts:
        return {"distinct_ratio": float("nan"), "boilerplate_share": float("nan"),
                "no_catalogue_word_share": float("nan"), "duplicate_share": float("nan")}
    norm = [re.sub(r"\s+", " ", t.strip().lower()) for t in texts]
    counts: dict[str, int] = {}
    for t in norm:
        counts[t] = counts.get(t, 0) + 1
    dup = np.array([counts[t] > 1 for t in norm])
    no_word = np.array([not (set(_WORD.findall(t)) & vocab) for t in norm])
    return {"distinct_ratio": len(counts) / len(norm),
            "boilerplate_share": float((dup | no_word).mean()),
            "no_catalogue_word_share": float(no_word.mean()),
            "duplicate_share": float(dup.mean())}
