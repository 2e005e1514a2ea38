"""Rank and Overall metrics on test (paper Table 2) for the retriever, the untuned backbone
and every fine-tuned run, in one table (the command line is train/evaluate.py).

A run name refers to runs/<dataset>/finetune/<name>/best; the suffix `+uid` evaluates that
run as ULMRec-uid (index and candidates only, no history; Table 4). Results are written to
results/<dataset>.json and .md; per-user predictions to <run>/test_predictions.parquet.

The retriever row ranks each target by the retriever's own scores with the pessimistic tie
rule every other row uses (ulmrec.metrics), not by list position. Each run's row records how
many test prompts were cut to max_len and whether it read leak-prone inputs (the authors'
preferences or user index); the table repeats both under it.
"""
from __future__ import annotations

import json
import os
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .config import from_dict
from .data import load_dataset
from .data.release import RELEASE_INDEX_NOTE
from .fusion import fit_lambda, fuse, log_softmax, ranked_scores
from .metrics import order_habits, rank_and_overall, sample_eval_users, target_ranks
from .model import score_orders
from .paths import REPO_ROOT, atomic_write, orders_name, prediction_suffix, repo_path, runs_root
from .ranker import RankerConfig, load_base, load_candidates, load_ranker, load_task_inputs
from .report import markdown_table
from .tasks import TaskConfig, eval_examples

log = logging.getLogger("ulmrec.evaluate")


@dataclass
class EvaluateConfig(RankerConfig, TaskConfig):
    """Which systems to evaluate on the test split."""
    runs: tuple[str, ...] = field(default=("ulmrec",), metadata={
        "nargs": "*",     # `--runs` alone: the baselines only (a retriever's own rows, no LLM)
        "help": "fine-tuned runs (runs/<dataset>/finetune/<name>); '<name>+uid' drops the history"})
    baselines: tuple[str, ...] = field(default=("retriever",), metadata={
        "help": "retriever (its own order) and/or backbone (untuned LLM, same prompts)"})
    max_users: int = field(default=0, metadata={"help": "test users sampled (0 = all)"})
    sample_block: int = field(default=0, metadata={
        "help": "which block of max_users to take from the seed's shuffled users: 0 = the usual "
                "sample, 1 = the next max_users (disjoint from block 0: a second sample); "
                "predictions of block b > 0 go to test_predictions_b<b>.parquet"})
    fusion_val_users: int = field(default=0, metadata={
        "help": "validation users (target retrieved) to fit each run's retriever-prior weight on; "
                "adds a '<run> + retriever prior' row (0 = no fusion row)"})
    test_orders: int = field(default=1, metadata={
        "help": "score each list in this many candidate orders (its own + shuffles) and average "
                "the items' letter log-probabilities (permutation self-consistency; costs as many "
                "forward passes); rows are named '<run> × N orders'"})
    batch_size: int = 8
    results_dir: str = "results"


def results_stem(results_dir: str, dataset: str) -> Path:
    """<results_dir>/<dataset> (+ .json / .md): where the table of a dataset is written."""
    return repo_path(results_dir) / Path(dataset).name


def _evaluate_scores(frame: pd.DataFrame, examples, scores: np.ndarray) -> dict:
    """Rank/Overall from letter scores of the retrieved users; the rest score 0 overall."""
    by_user = {ex.user: target_ranks(scores[i:i + 1], [ex.candidates.index(ex.target)])[0]
               for i, ex in enumerate(examples)}
    ranks = np.array([by_user.get(int(u), np.inf) for u in frame["user"]])
    return rank_and_overall(ranks, frame["target_in_candidates"].to_numpy())


def retriever_ranks(frame: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, retrieved): each target's pessimistic rank among the retriever's top-k by the
    retriever's scores (a tie counts against the target, as for every ranker row), inf and
    False where the target is not among them."""
    scores = np.full((len(frame), k), -np.inf)
    pos = np.full(len(frame), -1)
    for row, (cands, s, target) in enumerate(zip(frame["candidates"], frame["scores"],
                                                 frame["target"])):
        cands = [int(i) for i in cands][:k]
        s = np.asarray(s, dtype=np.float64)[:k]
        if len(s) != len(cands):
            raise ValueError(f"user {frame['user'].iloc[row]}: {len(cands)} candidates but "
                             f"{len(s)} retriever scores")
        scores[row, :len(s)] = s
        pos[row] = cands.index(int(target)) if int(target) in cands else -1
    return target_ranks(scores, pos), pos >= 0


def leak_notes(notes: list[str], scfg) -> list[str]:
    """The run's notes plus the authors' user index one where it shows that index (once, should
    load_task_inputs come to add it for fine-tuning's run notes too)."""
    release = scfg.index_kind == "release" and RELEASE_INDEX_NOTE not in notes
    return notes + ([RELEASE_INDEX_NOTE] if release else [])


def _retriever_scores(frame: pd.DataFrame, examples, k: int) -> np.ndarray:
    """[E, k] the retriever's scores of each example's candidates (letter order = retriever order)."""
    rows = frame.set_index("user")
    out = np.array([list(rows.at[ex.user, "scores"])[:k] for ex in examples], dtype=np.float64)
    for ex, row in zip(examples, (rows.at[ex.user, "candidates"] for ex in examples)):
        if [int(i) for i in row][:k] != ex.candidates:
            raise ValueError(f"user {ex.user}: prompt candidates differ from the retriever's list")
    return out


def _fit_fusion(ds, model, tok, inp, scfg, cfg) -> dict:
    """λ of the retriever prior fitted on validation users whose target was retrieved."""
    val = load_candidates(ds, cfg, "val")
    val = val[[int(t) in [int(c) for c in cs][: scfg.num_candidates]
               for t, cs in zip(val["target"], val["candidates"])]]
    keep = sample_eval_users(val["user"], cfg.fusion_val_users, cfg.seed + 1)
    examples, frame = eval_examples(ds, inp, val, "val", scfg, sorted(keep))
    _, probs = score_orders(model, tok, examples, cfg.test_orders, cfg.seed + 1,
                            fmt=scfg.prompt_format, max_len=scfg.max_len,
                            batch_size=cfg.batch_size, n_letters=scfg.num_candidates)
    pos = np.array([ex.candidates.index(ex.target) for ex in examples])
    return fit_lambda(probs.numpy(), _retriever_scores(frame, examples, scfg.num_candidates), pos)


def _run_config(name: str, base: EvaluateConfig) -> tuple[Path, EvaluateConfig]:
    run, _, variant = name.partition("+")
    folder = runs_root() / Path(base.dataset).name / "finetune" / run / "best"
    if not (folder / "ulmrec_config.json").exists():
        raise FileNotFoundError(f"{folder}: no trained adapter (run `python -m train.finetune "
                                f"--dataset {base.dataset} --run-name {run}`)")
    saved = json.loads((folder / "ulmrec_config.json").read_text())
    cfg = from_dict(EvaluateConfig, {**saved, "runs": base.runs, "baselines": base.baselines,
                                     "max_users": base.max_users, "batch_size": base.batch_size,
                                     "retriever": base.retriever, "seed": base.seed}, known_only=True)
    if variant == "uid":
        cfg = replace(cfg, no_history=True)
    elif variant:
        raise ValueError(f"unknown run variant '+{variant}' (only +uid)")
    return folder, cfg


def run(cfg: EvaluateConfig, command: str = "") -> dict:
    """Evaluate every system of `cfg` on its test users; writes the results table (JSON and
    markdown) and each run's per-user predictions, and returns the payload. `command` is
    recorded with the results (how to make them again)."""
    ds = load_dataset(cfg.data_config())
    cands = load_candidates(ds, cfg, "test")
    if cfg.max_users and len(cands) > cfg.max_users:
        keep = sample_eval_users(cands["user"], cfg.max_users, cfg.seed, cfg.sample_block)
        cands = cands[cands["user"].isin(keep)]
    elif cfg.sample_block:
        raise ValueError("--sample-block needs --max-users smaller than the test users")
    users = sorted(cands["user"].astype(int).tolist())
    results: dict[str, dict] = {}

    if "retriever" in cfg.baselines:
        ranks, retrieved = retriever_ranks(cands.sort_values("user"), cfg.num_candidates)
        results[f"retriever ({cfg.retriever})"] = rank_and_overall(ranks, retrieved)

    systems: list[tuple[str, Path | None, EvaluateConfig]] = []
    if "backbone" in cfg.baselines:
        systems.append(("backbone (untuned)", None, cfg))
    for name in cfg.runs:
        folder, run_cfg = _run_config(name, cfg)
        systems.append((name, folder, run_cfg))

    for name, folder, scfg in systems:
        t0 = time.time()
        if folder is None:
            model, tok = load_base(scfg)
            model.eval()
        else:
            model, tok = load_ranker(folder, scfg)
        inp, notes = load_task_inputs(ds, scfg)
        notes = leak_notes(notes, scfg)
        examples, frame = eval_examples(ds, inp, cands, "test", scfg, users)
        stats: dict = {}
        scores, probs = score_orders(model, tok, examples, cfg.test_orders, cfg.seed,
                                     fmt=scfg.prompt_format, max_len=scfg.max_len,
                                     batch_size=cfg.batch_size, n_letters=scfg.num_candidates,
                                     stats=stats)
        name = orders_name(name, cfg.test_orders)
        retr = _retriever_scores(frame, examples, scfg.num_candidates)
        # a residual run ranks by the sum it was trained as; its LLM term gets a row beside it
        llm_alone = _evaluate_scores(frame, examples, scores.numpy()) if scfg.residual else None
        ranked = ranked_scores(scores.numpy(), probs.numpy(), retr,
                               scfg.residual_weight if scfg.residual else None)
        res = _evaluate_scores(frame, examples, ranked)
        if scfg.residual:
            res["residual_weight"] = scfg.residual_weight
        res.update(order_habits(ranked))
        res["seconds_per_user"] = (time.time() - t0) / max(1, len(examples))
        res["truncated_prompts"] = stats["truncated"]
        if stats["truncated"]:
            notes = notes + [f"{stats['truncated']} of {stats['prompts']} test prompts were longer "
                             f"than max_len {scfg.max_len} and lost their beginning"]
        res["leak_prone"] = any("leak-prone" in n for n in notes)
        res["notes"] = notes
        results[name] = res
        log.info("%s: Rank NDCG@10 %.4f, Overall NDCG@10 %.4f (%d users ranked; top letter A "
                 "for %.1f%%)", name, res["rank"]["NDCG@10"], res["overall"]["NDCG@10"],
                 len(examples), 100 * res["top_letter_a"])
        if llm_alone is not None:
            llm_alone.update(order_habits(scores.numpy()))
            llm_alone.update({k: res[k] for k in ("truncated_prompts", "leak_prone", "notes")})
            results[f"{name} (LLM term alone)"] = llm_alone
        if folder is not None and cfg.fusion_val_users:
            fit = _fit_fusion(ds, model, tok, inp, scfg, cfg)
            with_prior = fuse(probs.numpy(), retr, fit["lambda"])
            fused = _evaluate_scores(frame, examples, with_prior)
            fused.update(order_habits(with_prior))
            fused["fusion"] = {k: v for k, v in fit.items() if k != "curve"}
            fused.update({k: res[k] for k in ("truncated_prompts", "leak_prone", "notes")})
            results[f"{name} + retriever prior"] = fused
            suffix = prediction_suffix(scfg.no_history, orders=cfg.test_orders)
            atomic_write(folder.parent / f"fusion{suffix}.json",
                         lambda p: p.write_text(json.dumps(fit, indent=1)))
            log.info("%s + retriever prior: λ %.2f (val NDCG@10 %.4f on %d users), Rank NDCG@10 "
                     "%.4f", name, fit["lambda"], fit["val_ndcg"], fit["val_users"],
                     fused["rank"]["NDCG@10"])
        if folder is not None:
            # probs: what the run ranks by (a residual run's sum, normalised); llm_probs: its
            # LLM term, the input of the after-the-fact prior
            shown = probs.numpy() if not scfg.residual else np.exp(log_softmax(ranked))
            pred = pd.DataFrame({"user": [e.user for e in examples],
                                 "candidates": [e.candidates for e in examples],
                                 "target": [e.target for e in examples],
                                 "probs": shown.tolist(),
                                 "llm_probs": probs.numpy().tolist(),
                                 "retriever_scores": retr.tolist()})
            suffix = prediction_suffix(scfg.no_history, cfg.sample_block, cfg.test_orders)
            name = f"test_predictions{suffix}.parquet"
            atomic_write(folder.parent / name, lambda p: pred.to_parquet(p, index=False))
        del model

    stem = results_stem(cfg.results_dir, cfg.dataset)
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": ds.name, "test_users": len(users), "retriever": cfg.retriever,
               # paths relative to the repo root: results are committed, machine paths are not
               "command": command.replace(str(REPO_ROOT) + os.sep, ""),
               "results": results}
    atomic_write(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(payload, indent=1, default=str)))
    atomic_write(stem.with_suffix(".md"), lambda p: p.write_text(results_table(payload) + "\n"))
    return payload


def results_table(payload: dict) -> str:
    cols = ["Recall@5", "NDCG@5", "MRR@5", "Recall@10", "NDCG@10", "MRR@10"]
    short = {"Recall": "R", "NDCG": "N", "MRR": "M"}
    head = ["system", "view"] + [short[c.split("@")[0]] + "@" + c.split("@")[1] for c in cols]
    rows = [[name, view.capitalize()] + [f"{res[view][c]:.4f}" for c in cols]
            for name, res in payload["results"].items() for view in ("rank", "overall")]
    lines = [f"{payload['dataset']} test, {payload['test_users']} users; `{payload['command']}`", "",
             markdown_table(head, rows, "ll" + "r" * len(cols))]
    # what qualifies a row goes with the table, not only into the JSON
    flagged = [(name, res) for name, res in payload["results"].items()
               if res.get("leak_prone") or res.get("truncated_prompts")]
    if flagged:
        lines.append("")
    for name, res in flagged:
        for note in res.get("notes", []):
            if "leak-prone" in note or "max_len" in note:
                lines.append(f"- {name}: {note}")
    return "\n".join(lines)
