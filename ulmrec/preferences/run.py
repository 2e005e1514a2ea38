"""Run one backend over every user of a dataset: prompt → cache → clean → fallback → file.

Each user is asked once: the answer is appended to runs/<dataset>/preferences/cache.jsonl
as soon as it arrives, keyed by (user, prompt hash, backend, model), so a re-run skips
done users and an interrupted run resumes. A user whose request failed is recorded with
its error and retried by the next run. An empty or refused answer becomes the extractive
summary, marked 'fallback'. At the end every user has a text in
<task>-<backend>.json (reviewerID → text, with each user's status), written atomically;
a user still failing gets the extractive text there, marked 'failed'.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from ..data import load_dataset
from ..paths import atomic_write_json, runs_root
from .cache import DONE, CacheWriter, cache_key, read_cache
from .clean import clean_text
from .extractive import ExtractiveBackend
from .local import LocalBackend
from .openai_compat import OpenAIBackend
from .prompt import TASKS, PromptConfig, build_prompt, user_histories
from .release import ReleaseBackend, release_coverage, release_preferences

log = logging.getLogger(__name__)

BACKENDS = ("auto", "release", "local", "openai", "extractive")



@dataclass
class PreferenceConfig:
    """Extract one preference (or intent) text per user from their training reviews."""
    dataset: str = field(default="gift-cards", metadata={"help": "dataset name or folder"})
    backend: str = field(default="auto", metadata={
        "help": "auto = release where it covers the dataset, else local", "choices": BACKENDS})
    task: str = field(default="preference", metadata={"help": "preference | intent",
                                                      "choices": sorted(TASKS)})
    local_model: str | None = field(default=None, metadata={
        "help": "HF path/id for --backend local (default: embedded SmolLM2-135M-Instruct)"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: auto)"})
    batch_size: int = field(default=16, metadata={"help": "local: prompts per generate call"})
    max_new_tokens: int = field(default=48, metadata={"help": "bound on generated tokens"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch default)"})
    base_url: str = field(default="https://api.openai.com/v1", metadata={
        "help": "openai: server root, e.g. http://127.0.0.1:8000/v1 for vLLM / llama.cpp"})
    openai_model: str = field(default="gpt-3.5-turbo", metadata={"help": "openai: model name"})
    concurrency: int = field(default=4, metadata={"help": "openai: requests in flight"})
    timeout_s: float = field(default=60.0, metadata={"help": "openai: per-request timeout"})
    max_retries: int = field(default=5, metadata={"help": "openai: retries on 429/5xx/timeout"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "history token budget"})
    max_review_tokens: int = field(default=96, metadata={"help": "cut each review to this"})
    limit: int = field(default=0, metadata={"help": "only the first N users (0: all)"})
    out_dir: str | None = field(default=None, metadata={
        "help": "default runs/<dataset>/preferences (ULMREC_RUNS overrides runs/)"})


def make_backend(cfg: PreferenceConfig, ds):
    kind = cfg.backend
    if kind == "auto":
        kind = "release" if cfg.task == "preference" and release_coverage(ds) == 1.0 else "local"
        log.info("backend auto → %s", kind)
    if kind == "release":
        return ReleaseBackend(ds, cfg.task)
    if kind == "extractive":
        return ExtractiveBackend(ds)
    if kind == "local":
        return LocalBackend(cfg.local_model, cfg.device, cfg.batch_size, cfg.max_new_tokens)
    if kind == "openai":
        return OpenAIBackend(base_url=cfg.base_url, model=cfg.openai_model,
                             max_tokens=cfg.max_new_tokens, concurrency=cfg.concurrency,
                             timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)
    raise ValueError(f"unknown backend '{cfg.backend}' (known: {', '.join(BACKENDS)})")


def output_path(out_dir: Path, task: str, backend_name: str) -> Path:
    return Path(out_dir) / f"{task}-{backend_name}.json"


def extract(ds, backend, cfg: PreferenceConfig, out_dir: Path | None = None,
            progress: bool = True) -> dict:
    """Run `backend` over the dataset's users; returns the run summary (also in the file)."""
    out_dir = Path(out_dir or cfg.out_dir or runs_root() / ds.name / "preferences")
    pcfg = PromptConfig(task=cfg.task, max_prompt_tokens=cfg.max_prompt_tokens,
                        max_review_tokens=cfg.max_review_tokens)
    histories = user_histories(ds)
    users = sorted(histories)[:cfg.limit or None]
    settings = {"backend": backend.name, "model": backend.model_id, **backend.settings}
    prompts = [build_prompt(u, histories[u], pcfg, backend.count_tokens).finalize(settings)
               for u in tqdm(users, desc="prompts", disable=not progress, leave=False)]
    keys = {p.user: cache_key(p.user, p.key_hash, backend.name, backend.model_id)
            for p in prompts}

    cache_path = out_dir / "cache.jsonl"
    cache = read_cache(cache_path)
    todo = [p for p in prompts if cache.get(keys[p.user], {}).get("status") not in DONE]
    retry = sum(1 for p in todo if keys[p.user] in cache)
    counts = {"done": 0, "cached": len(prompts) - len(todo), "failed": 0, "fallback": 0}
    log.info("%s %s/%s: %d users, %d cached, %d to do (%d retried after failure)",
             ds.name, backend.name, backend.model_id, len(prompts), counts["cached"],
             len(todo), retry)

    fallback = backend if isinstance(backend, ExtractiveBackend) else None
    generative = backend.name in ("local", "openai")
    t0 = time.time()
    with CacheWriter(cache_path) as writer, tqdm(total=len(prompts), initial=counts["cached"],
                                                 desc=f"{cfg.task} [{backend.name}]",
                                                 disable=not progress) as bar:
        for p, out in backend.generate(todo):
            key, meta = keys[p.user], {"backend": backend.name, "model": backend.model_id,
                                       "task": cfg.task}
            if isinstance(out, Exception):
                writer.write(key, p.user, "failed", "", error=f"{type(out).__name__}: {out}",
                             **meta)
                counts["failed"] += 1
                log.warning("user %d failed: %s: %s", p.user, type(out).__name__, out)
            else:
                text = clean_text(out, p.prefix) if generative else out.strip()
                status = "ok"
                if not text:
                    fallback = fallback or ExtractiveBackend(ds)
                    text, status = fallback.summarize(p.user, cfg.task), "fallback"
                    counts["fallback"] += 1
                counts["done"] += 1
                writer.write(key, p.user, status, text, raw=out[:2000], **meta)
            bar.update(1)
            bar.set_postfix(counts, refresh=False)
    seconds = time.time() - t0

    # Assemble the file every later stage reads: one text per user, never a hole.
    cache = read_cache(cache_path)
    rid = ds.users.set_index("user")["reviewerID"]
    texts, status = {}, {}
    for p in prompts:
        rec = cache.get(keys[p.user])
        if rec and rec["status"] in DONE:
            texts[rid[p.user]], status[rid[p.user]] = rec["text"], rec["status"]
        else:
            fallback = fallback or ExtractiveBackend(ds)
            texts[rid[p.user]] = fallback.summarize(p.user, cfg.task)
            status[rid[p.user]] = "failed"
    summary = {"dataset": ds.name, "task": cfg.task, "backend": backend.name,
               "model": backend.model_id, "users": len(prompts), **counts,
               "still_failed": sum(s == "failed" for s in status.values()),
               "seconds": round(seconds, 1),
               "users_per_s": round(len(todo) / seconds, 3) if todo and seconds else None,
               "config": asdict(cfg)}
    path = output_path(out_dir, cfg.task, backend.name)
    atomic_write_json(path, {"summary": summary, "texts": texts, "status": status}, ensure_ascii=False)
    log.info("wrote %s: %s", path, {k: summary[k] for k in
                                     ("users", "done", "cached", "failed", "fallback")})
    summary["path"] = str(path)
    return summary


def load_preferences(ds, task: str = "preference", backend: str = "auto",
                     out_dir: Path | None = None) -> pd.Series:
    """user → text for later stages. 'auto': the release where it covers the dataset, else
    the first extracted file found among local, openai, extractive."""
    if backend == "auto" and task == "preference" and release_coverage(ds) == 1.0:
        return release_preferences(ds)
    out_dir = Path(out_dir or runs_root() / ds.name / "preferences")
    names = ["local", "openai", "extractive"] if backend == "auto" else [backend]
    for name in names:
        path = output_path(out_dir, task, name)
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            by_rid = pd.Series(data["texts"], dtype=str)
            users = ds.users.set_index("reviewerID")["user"]
            missing = sorted(set(users.index) - set(by_rid.index))
            if missing:
                raise ValueError(f"{path}: no text for {len(missing)} users (e.g. {missing[:3]}); "
                                 f"re-run python -m train.preferences --dataset {ds.name}")
            return pd.Series(by_rid.reindex(users.index).values, index=users.values,
                             name=task).sort_index()
    raise FileNotFoundError(f"no {task} file for {ds.name} under {out_dir} (looked for "
                            f"{', '.join(names)}); run python -m train.preferences "
                            f"--dataset {ds.name}")


def run(cfg: PreferenceConfig) -> dict:
    """Extract every user's text with the configured backend; the extraction summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = load_dataset(cfg.dataset)
    return extract(ds, make_backend(cfg, ds), cfg)
