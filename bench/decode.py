"""Benchmark: does a user's index decode to that user's preferences, level by level?

On N sampled users it decodes every prefix of each user's index (<a>, <a><b>, <a><b><c>,
the full index) with the trained index→preference task, embeds the texts with the packaged
all-MiniLM-L6-v2, and reports, beside two references that need no model (each user's
extractive summary; a random other user's reference preference):

* own-preference retrieval: the full-index text's cosine to the user's own reference
  preference vs 99 other users' → own_mrr, own_hit1, own_hit10 (chance MRR ≈ 0.052);
* prefix fidelity at a, a-b, a-b-c: the prefix's text's cosine to the centroid of the
  reference preferences of every user sharing the prefix vs 9 other prefixes' centroids
  → level_a_accuracy … (chance 0.1 where 9 other prefixes exist; level_*_chance says);
* diversity of the full-index texts: distinct_ratio, boilerplate_share (no catalogue word,
  or the same text as another user's);
* invented names: invented_share, the share of full-index texts naming a title-like name
  that no catalogue title contains (ulmrec.decode.CatalogueNames; invented_share_all over
  every rung's text).

Reference text: the authors' GPT-3.5 preferences on games/beauty (leak-prone: written from
all of a user's reviews), the preferences stage's output elsewhere. Results go to
results/decode-<dataset>.json and .md, with three example ladders (the sampled users with
the most training items) and each rung's data profile (ulmrec.profile).

    python -m bench.decode --bundle assets/demo --users 150
    python -m bench.decode --run runs/games/finetune/decode --users 500
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ulmrec.config import from_dict, parse_config
from ulmrec.decode import (CatalogueNames, DecodeSettings, catalogue_vocab, centroids,
                           decode_indices, diversity, own_retrieval, prefix_fidelity,
                           sample_negatives)
from ulmrec.indexing.table import level_letter, parse_token_string, token_string
from ulmrec.paths import atomic_write, atomic_write_json, display_path, repo_path
from ulmrec.report import markdown_table

log = logging.getLogger("bench.decode")

SYSTEMS = {"model": "ULMRec decode", "extractive": "extractive summary (no model)",
           "random_user": "a random other user's reference",
           "own_reference": "the user's own reference (a perfect per-user writer)",
           "prefix_medoid": "the prefix's most central other user's reference"}
GENERIC = {"user", "users", "preference", "preferences", "prefer", "prefers", "preferred",
           "like", "likes", "interest", "interests", "interested", "enjoy", "enjoys", "product",
           "products", "item", "items", "quality", "great", "good", "various", "specific",
           "customizable", "needs", "experience"}


@dataclass
class DecodeBenchConfig:
    """Index → preference decoding quality of a bundle or a fine-tuning run."""
    bundle: str | None = field(default=None, metadata={"help": "bundle folder or Hub repo id"})
    run: str | None = field(default=None, metadata={
        "help": "fine-tuning run folder (runs/<dataset>/finetune/<name>, or its best/ or last/)"})
    dataset: str | None = field(default=None, metadata={
        "help": "dataset (default: the bundle's / the run's)"})
    users: int = field(default=500, metadata={"help": "users sampled (0 = all)"})
    reference: str = field(default="auto", metadata={
        "help": "reference preferences: auto (authors' text where it covers the dataset, else "
                "the preferences stage output), release, local, openai, extractive"})
    max_new_tokens: int = 48
    max_sentences: int = field(default=2, metadata={"help": "stop a text after this many sentences"})
    no_repeat_ngram_size: int = 3
    repetition_penalty: float = 1.15
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call"})
    contrast: float | None = field(default=None, metadata={
        "help": "index contrast weight w (0 = plain greedy): log p(y|index) + w·(log p(y|index)"
                " − log p(y|no index)) over plausible tokens (ulmrec.decode.IndexContrast); "
                "default: the bundle's own (its manifest), for a run DecodeSettings.contrast"})
    plausibility: float = field(default=0.1, metadata={
        "help": "with --contrast: keep tokens with p(y|index) ≥ this × the best one"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (1: on a busy shared CPU, 2 threads ran 10× slower)"})
    bf16: bool = field(default=False, metadata={
        "help": "CPU: cast the merged model to bfloat16 (faster; texts may differ slightly)"})
    negatives: int = field(default=99, metadata={"help": "other users per own-retrieval query"})
    prefix_negatives: int = field(default=9, metadata={"help": "other prefixes per fidelity query"})
    examples: int = field(default=3, metadata={"help": "example ladders written (most training items)"})
    references_only: bool = field(default=False, metadata={
        "help": "decode nothing: measure the reference rows only, plus two ceilings (the "
                "user's own reference; the prefix's most central other member's), to "
                "results/decode-<dataset>-references.*"})
    seed: int = 0
    results_dir: str = "results"


# ------------------------------------------------------------------ inputs

@dataclass
class Inputs:
    dataset: str
    model: object                # None with --references-only (no text is decoded)
    tokenizer: object
    prompt_format: str | None
    index: pd.Series             # user → index string (every user with one)
    source: dict                 # what was loaded (bundle / run, adapter, config)
    contrast: float = DecodeSettings.contrast    # the weight it decodes with unless --contrast


def _load_bundle(cfg: DecodeBenchConfig) -> Inputs:
    from ulmrec.bundle import load_bundle
    b = load_bundle(cfg.bundle)
    if b.manifest.index_kind not in ("pid", "release"):
        raise SystemExit(f"{cfg.bundle}: index kind '{b.manifest.index_kind}' has no "
                         "semantic index to decode")
    model = tok = fmt = None
    if not cfg.references_only:         # its decode/ adapter when it has one, else the ranker
        model, tok, fmt = b.decoder()
    index = b.users.set_index("user")["index"].dropna().astype(str)
    return Inputs(b.dataset, model, tok, fmt, index,
                  {"bundle": display_path(b.root),
                   "run": (b.manifest.decode or {}).get("run") or b.manifest.run,
                   "preference_source": b.manifest.preference_source, "notes": b.notes},
                  b.decode_settings.contrast)


def _adapter_folder(path: Path) -> Path:
    for cand in (path, path / "best", path / "last"):
        if (cand / "adapter_config.json").exists() and (cand / "ulmrec_config.json").exists():
            return cand
    raise SystemExit(f"{path}: no adapter (adapter_config.json + ulmrec_config.json) here or in "
                     "best/ or last/")


def _load_run(cfg: DecodeBenchConfig) -> Inputs:
    from ulmrec.bundle import ServeConfig
    from ulmrec.data import load_dataset
    from ulmrec.ranker import load_ranker, load_pid_table
    from ulmrec.tasks import user_index_strings
    folder = _adapter_folder(repo_path(cfg.run))
    saved = json.loads((folder / "ulmrec_config.json").read_text())
    if cfg.dataset:
        saved["dataset"] = cfg.dataset
    scfg = from_dict(ServeConfig, saved, known_only=True)
    if scfg.index_kind not in ("pid", "release"):
        raise SystemExit(f"{folder}: index kind '{scfg.index_kind}' has no semantic index to decode")
    ds = load_dataset(scfg.data_config())
    pid = load_pid_table(ds.name, scfg.index_run) if scfg.index_kind == "pid" else None
    index = user_index_strings(ds, scfg.index_kind, pid).dropna().astype(str)
    model, tok = (None, None) if cfg.references_only else load_ranker(folder, scfg)
    return Inputs(ds.name, model, tok, scfg.prompt_format, index,
                  {"run": display_path(folder), "preference_source": scfg.preference_source,
                   "index_kind": scfg.index_kind})


def reference_texts(ds, source: str) -> tuple[pd.Series, dict]:
    """user → reference preference, and what it is (name, leak_prone, note)."""
    from ulmrec.preferences import load_preferences, release_coverage, release_preferences
    if source == "release" or (source == "auto" and release_coverage(ds) >= 0.95):
        return release_preferences(ds), {
            "name": "release", "leak_prone": True,
            "note": f"the authors' GPT-3.5 preferences ({release_coverage(ds):.1%} of users), written "
                    "from ALL of a user's reviews: leak-prone (may mention validation/test items)"}
    if source == "auto":            # the preferences stage's output, best backend first
        for name in ("local", "openai"):
            try:
                return load_preferences(ds, backend=name), {
                    "name": name, "leak_prone": False,
                    "note": f"the preferences stage's '{name}' output (training reviews only)"}
            except (FileNotFoundError, ValueError):
                continue
        source = "extractive"
    if source == "extractive":
        return extractive_texts(ds), {
            "name": "extractive", "leak_prone": False,
            "note": "the preferences stage's extractive summaries (training reviews only)"}
    return load_preferences(ds, backend=source), {
        "name": source, "leak_prone": False, "note": f"the preferences stage's '{source}' output"}


def extractive_texts(ds) -> pd.Series:
    from ulmrec.preferences import load_preferences
    from ulmrec.preferences.run import PreferenceConfig, extract, make_backend
    try:
        return load_preferences(ds, backend="extractive")
    except (FileNotFoundError, ValueError):
        pcfg = PreferenceConfig(dataset=ds.name, backend="extractive")
        extract(ds, make_backend(pcfg, ds), pcfg)
        return load_preferences(ds, backend="extractive")


def prefixes_of(index: str) -> list[str]:
    codes = parse_token_string(index)
    return [token_string(codes[: k + 1]) for k in range(len(codes))]


def level_name(k: int) -> str:
    """0 → 'a', 1 → 'ab', 2 → 'abc' (the metric keys: level_ab_accuracy …)."""
    return "".join(level_letter(i) for i in range(k + 1))


# ------------------------------------------------------------------ the measurement

def prefix_medoids(ref_vec: np.ndarray, codes: list[list[int]], n_levels: int,
                   rows: np.ndarray) -> np.ndarray:
    """[N, n_levels] for the users at `rows` of ref_vec [M, D]: at each level, the row of the
    prefix-mate (never the user) whose reference is closest to the prefix's centroid; -1
    where no one else shares the prefix."""
    best = np.full((len(rows), n_levels), -1)
    for k in range(n_levels):
        keys = np.array([token_string(c[: k + 1]) for c in codes])
        uniq, cent = centroids(ref_vec, keys)
        pos = {key: i for i, key in enumerate(uniq)}
        for i, r in enumerate(rows):
            mates = np.flatnonzero(keys == keys[r])
            mates = mates[mates != r]
            if len(mates):
                best[i, k] = mates[np.argmax(ref_vec[mates] @ cent[pos[keys[r]]])]
    return best


def measure(outputs: dict[str, dict[int, list[str]]], refs: pd.Series, index: pd.Series,
            sample: list[int], embed, vocab: set[str], negatives: int = 99,
            prefix_negatives: int = 9, seed: int = 0, medoid: bool = False,
            names: CatalogueNames | None = None) -> dict[str, dict]:
    """Metrics per system. outputs[system][user] = texts per prefix level (last = full
    index); refs: user → reference text (pool = every user with one and an index);
    embed(texts) → unit vectors [n, D]. medoid adds the system "prefix_medoid": at each
    level, the reference of the user's prefix-mate closest to the prefix's centroid (the
    best any one real text of that prefix does; "" where the prefix is the user's alone)."""
    pool = [int(u) for u in index.index if isinstance(refs.get(u), str) and refs.get(u).strip()]
    row = {u: i for i, u in enumerate(pool)}
    ref_vec = embed([refs[u] for u in pool])
    rng = np.random.default_rng(seed)
    own = np.array([row[u] for u in sample])
    neg = sample_negatives(len(pool), own, negatives, rng)
    codes = [parse_token_string(index[u]) for u in pool]
    n_levels = min(len(c) for c in codes)
    groups, cents, mine, pneg = {}, {}, {}, {}
    for k in range(n_levels - 1):
        keys = np.array([token_string(c[: k + 1]) for c in codes])
        uniq, cents[k] = centroids(ref_vec, keys)
        pos = {key: i for i, key in enumerate(uniq)}
        mine[k] = np.array([pos[keys[row[u]]] for u in sample])
        pneg[k] = sample_negatives(len(uniq), mine[k], prefix_negatives, rng)
        groups[k] = len(uniq)
    if medoid:
        best = prefix_medoids(ref_vec, codes, n_levels, own)
        outputs = {**outputs, "prefix_medoid": {
            u: [refs[pool[j]] if j >= 0 else "" for j in best[i]] for i, u in enumerate(sample)}}
    out: dict[str, dict] = {}
    for system, texts in outputs.items():
        flat = sorted({t for u in sample for t in texts[u]})
        vec = dict(zip(flat, embed(flat)))
        full = np.stack([vec[texts[u][-1]] for u in sample])
        res = own_retrieval(full, ref_vec, own, neg)
        for k in range(n_levels - 1):
            lv = np.stack([vec[texts[u][k]] for u in sample])
            fid = prefix_fidelity(lv, cents[k], mine[k], pneg[k])
            name = level_name(k)
            res[f"level_{name}_accuracy"] = fid["accuracy"]
            res[f"level_{name}_mrr"] = fid["mrr"]
            res[f"level_{name}_chance"] = fid["chance"]
            prefixes = {token_string(parse_token_string(index[u])[: k + 1]) for u in sample}
            outs = {texts[u][k] for u in sample}
            res[f"level_{name}_distinct_ratio"] = len(outs) / max(1, len(prefixes))
        res.update(diversity([texts[u][-1] for u in sample], vocab))
        if names is not None:
            res["invented_share"] = names.share([texts[u][-1] for u in sample])
            res["invented_share_all"] = names.share([t for u in sample for t in texts[u] if t])
        out[system] = res
    k_eff = min(negatives, len(pool) - 1)
    meta = {"pool_users": len(pool), "own_candidates": k_eff + 1,
            "own_mrr_chance": float(np.mean(1.0 / np.arange(1, k_eff + 2))),
            "prefixes_per_level": {level_name(k): groups[k] for k in groups}}
    return {"results": out, "meta": meta}


def results_table(payload: dict) -> str:
    levels = [k for k in payload["levels"]]
    cols = [("own_mrr", "own MRR"), ("own_hit1", "hit@1"), ("own_hit10", "hit@10")] + \
        [(f"level_{lv}_accuracy", f"{'-'.join(lv)} acc") for lv in levels] + \
        [("distinct_ratio", "distinct"), ("boilerplate_share", "boilerplate")]
    first = next(iter(payload["results"].values()))
    if "invented_share" in first:      # results written before the metric existed lack it
        cols.append(("invented_share", "invented"))
    ref = payload["reference"]
    t = payload["timing"]
    lines = [
        f"**{payload['dataset']}**, {payload['users']} users (of {payload['meta']['pool_users']} "
        f"with a reference); reference = {ref['note']}"
        + (" — **leak-prone**" if ref.get("leak_prone") else ""), "",
        f"`{payload['command']}`", ""]
    rows = []
    for system, res in payload["results"].items():
        same = " (= the reference text: an upper bound)" if system == "extractive" and \
            ref.get("name") == "extractive" else ""
        rows.append([f"{SYSTEMS.get(system, system)}{same}"] + [f"{res[k]:.3f}" for k, _ in cols])
    rows.append(["chance", f"{payload['meta']['own_mrr_chance']:.3f}",
                 f"{1 / payload['meta']['own_candidates']:.3f}",
                 f"{min(1.0, 10 / payload['meta']['own_candidates']):.3f}"]
                + [f"{first[f'level_{lv}_chance']:.3f}" for lv in levels] + [""] * (len(cols) - 3 - len(levels)))
    lines.append(markdown_table(["system"] + [c[1] for c in cols], rows, "l" + "r" * len(cols)))
    lines += ["", f"Own retrieval: the full-index text vs the user's reference and "
              f"{payload['meta']['own_candidates'] - 1} other users' (MiniLM cosine, ties count "
              "against). Prefix accuracy: the prefix's text is closest to the centroid of the "
              "references of the users sharing it, among it and up to "
              f"{payload['prefix_negatives']} other prefixes' centroids. Distinct = distinct "
              "full-index texts / users; boilerplate = no catalogue word, or another user's exact "
              "text; invented = the full-index text names a title-like name that no catalogue "
              "title contains.", ""]
    if t["generations"]:
        lines += [f"Decoding: {t['generations']} distinct prompts in {t['decode_seconds']:.0f} s "
                  f"({t['seconds_per_generation']:.2f} s each, {t['threads']} CPU thread(s), "
                  f"batch {payload['settings']['batch_size']}); settings "
                  f"`{json.dumps(payload['settings'])}`."]
    if payload.get("examples"):
        lines += ["", "### Example ladders (the sampled users with the most training items)"]
        for ex in payload["examples"]:
            lines += ["", f"**{ex['reviewerID']}** (#{ex['user']}, {ex['train_items']} training items), "
                      f"reference: *{ex['reference']}*", ""]
            rungs = []
            for r in ex["rungs"]:
                prof = r["profile_text"].split(" · ", 1)[-1] if " · " in r["profile_text"] else ""
                rungs.append([f"`{r['prefix']}`", r["generated"], r["users"], prof.replace("|", "/")])
            lines.append(markdown_table(["prefix", "generated", "users", "what they share (data)"],
                                        rungs, "llrl"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from ulmrec.data import load_dataset
    from ulmrec.indexing.encoder import embed, embed_cached, load_encoder
    from ulmrec.metrics import sample_eval_users
    from ulmrec.profile import ProfileIndex

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(DecodeBenchConfig, argv)
    if bool(cfg.bundle) == bool(cfg.run):
        raise SystemExit("give exactly one of --bundle or --run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inp = _load_bundle(cfg) if cfg.bundle else _load_run(cfg)
    ds = load_dataset(cfg.dataset or inp.dataset)
    refs, ref_info = reference_texts(ds, cfg.reference)
    extractive = extractive_texts(ds)
    train = ds.sequences("train")
    titles = dict(zip(ds.items["item"].astype(int), ds.items["title"].astype(str)))
    index = inp.index[[u for u in inp.index.index if u in train.index]]
    has_ref = [int(u) for u in index.index if isinstance(refs.get(u), str) and refs.get(u).strip()]
    sample = sample_eval_users(has_ref, cfg.users, cfg.seed)
    log.info("%s: %d users sampled of %d with an index and a reference (%s)", ds.name,
             len(sample), len(has_ref), ref_info["name"])

    # decode every prefix of every sampled user (each distinct prefix once)
    model = inp.model
    if model is not None:
        if hasattr(model, "merge_adapter") and next(model.parameters()).device.type == "cpu":
            model.merge_adapter()       # as the app serves it: same outputs, faster on CPU
        if cfg.bf16 and next(model.parameters()).device.type == "cpu":
            model.to(torch.bfloat16)
        model.eval()
    settings = DecodeSettings(cfg.max_new_tokens, cfg.no_repeat_ngram_size, cfg.repetition_penalty,
                              cfg.max_sentences, cfg.batch_size,
                              inp.contrast if cfg.contrast is None else cfg.contrast, cfg.plausibility)
    ladders = {u: prefixes_of(index[u]) for u in sample}
    todo = [] if cfg.references_only else sorted({p for ps in ladders.values() for p in ps},
                                                 key=lambda p: (p.count("<"), p))
    t0 = time.time()
    texts = decode_indices(model, inp.tokenizer, todo, inp.prompt_format, settings) if todo else []
    decode_s = time.time() - t0
    decoded = dict(zip(todo, texts))
    log.info("decoded %d prefixes in %.0f s", len(todo), decode_s)

    rng = np.random.default_rng(cfg.seed + 1)
    pos = {u: i for i, u in enumerate(has_ref)}
    other = {}
    for u in sample:                # a random other user, never the user itself
        j = int(rng.integers(len(has_ref) - 1))
        other[u] = has_ref[j + (j >= pos[u])]
    outputs = {} if cfg.references_only else {
        "model": {u: [decoded[p] for p in ladders[u]] for u in sample}}
    outputs["extractive"] = {u: [str(extractive.get(u) or "")] * len(ladders[u]) for u in sample}
    outputs["random_user"] = {u: [refs[other[u]]] * len(ladders[u]) for u in sample}
    if cfg.references_only:         # the two ceilings instead of the model
        outputs["own_reference"] = {u: [refs[u]] * len(ladders[u]) for u in sample}
    enc = load_encoder()

    def embed_texts(batch: list[str]) -> np.ndarray:
        if len(batch) > 2000:
            return embed_cached(enc, batch, desc="references")[0]
        return embed(enc, batch)

    catalogue = list(titles.values()) + (
        ds.items["category"].dropna().astype(str).tolist() if "category" in ds.items else [])
    vocab = catalogue_vocab(catalogue, GENERIC)
    names = CatalogueNames(catalogue, refs.dropna().astype(str).tolist())
    measured = measure(outputs, refs, index, sample, embed_texts, vocab, cfg.negatives,
                       cfg.prefix_negatives, cfg.seed, medoid=cfg.references_only, names=names)

    # example ladders: the sampled users with the most training items (ties: smaller id)
    users_tab = ds.users.set_index("user")
    prof = ProfileIndex.build(index.tolist(), [train.get(u, []) for u in index.index], titles,
                              [refs.get(u) for u in index.index])
    n_examples = 0 if cfg.references_only else cfg.examples       # ladders need decoded texts
    chosen = sorted(sample, key=lambda u: (-len(train.get(u, [])), u))[:n_examples]
    examples = []
    for u in chosen:
        rungs = []
        for p in ladders[u]:
            pr = prof.profile(p)
            rungs.append({"prefix": p, "generated": decoded[p], "users": pr.users,
                          "profile": pr.as_dict(), "profile_text": pr.text()})
        examples.append({"user": int(u), "reviewerID": str(users_tab.at[u, "reviewerID"]),
                         "train_items": len(train.get(u, [])), "reference": refs[u],
                         "extractive": str(extractive.get(u) or ""), "rungs": rungs})

    n_levels = len(parse_token_string(index[sample[0]])) if sample else 4
    payload = {
        "dataset": ds.name, "users": len(sample), "seed": cfg.seed,
        "command": "python -m bench.decode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": inp.source, "reference": ref_info, "systems": SYSTEMS,
        "levels": [level_name(k) for k in range(n_levels - 1)],
        "prefix_negatives": cfg.prefix_negatives, "settings": asdict(settings),
        "timing": {"generations": len(todo), "decode_seconds": round(decode_s, 1),
                   "seconds_per_generation": round(decode_s / max(1, len(todo)), 3),
                   "seconds_per_user": round(decode_s / max(1, len(sample)), 3), "threads": cfg.threads,
                   "bf16": cfg.bf16},
        "meta": measured["meta"], "results": measured["results"], "examples": examples,
    }
    stem = repo_path(cfg.results_dir) / (f"decode-{Path(ds.name).name}"
                                         + ("-references" if cfg.references_only else ""))
    atomic_write_json(stem.with_suffix(".json"), payload)
    table = results_table(payload)
    atomic_write(stem.with_suffix(".md"), lambda p: Path(p).write_text(table + "\n", encoding="utf-8"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
