"""Two fine-tuning processes on CPU (torchrun, gloo, ACCELERATE_USE_CPU): the LR schedule
steps once per optimizer step, exactly as in one process, and process 0's validation decides
for both, so they stop together (before: with the scheduler in acc.prepare two processes
stepped it twice per step; with validation on process 0 only, process 1 saw NaN, early-stopped
alone and left process 0 hanging)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import finetune
from ulmrec import trainer
from ulmrec.config import parse_config

HERE = Path(__file__).resolve().parent
# lr 1e-9: the weights barely move, so the second validation cannot beat the first and
# patience 1 stops the run at step 4 of 10, in every process
ARGS = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random",
        "--index-kind", "oid", "--preference-source", "none", "--max-history", "3",
        "--max-title-words", "4", "--max-len", "192", "--batch-size", "2",
        "--max-train-examples", "40", "--eval-users", "4", "--lora-dropout", "0",
        "--learning-rate", "1e-9", "--warmup-steps", "2", "--max-steps", "10",
        "--eval-every", "2", "--patience", "1"]


def test_two_processes_share_one_lr_schedule_and_stop_together(tmp_path, monkeypatch):
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_finetune.py"), str(out), *ARGS, "--run-name", "ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    single = finetune.train(parse_config(finetune.FinetuneConfig, ARGS + ["--run-name", "single"]))
    assert single["processes"] == 1 and single["early_stop"] and single["steps"] == 4

    for r in ranks:
        assert r["processes"] == 2
        assert r["early_stop"] is True and r["steps"] == 4      # stopped together, early
        assert r["scheduler_steps"] == r["steps"]                # one scheduler step per step
        assert r["lr"] == pytest.approx(single["lr"][: r["steps"]], rel=1e-9, abs=0)
        assert [h["step"] for h in r["history"]] == [2, 4]
    # process 0's scores, broadcast (the loss is each process's own batch)
    assert [{k: v for k, v in h.items() if k != "loss"} for h in ranks[0]["history"]] == \
        [{k: v for k, v in h.items() if k != "loss"} for h in ranks[1]["history"]]
    assert ranks[0]["lr"] == ranks[1]["lr"]
    assert len(set(ranks[0]["lr"])) > 2                          # warm-up and decay, not a flat line
    summary = json.loads((tmp_path / "runs" / "gift-cards" / "finetune" / "ddp" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["processes"] == 2


def test_mixed_precision_follows_the_hardware(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer.mixed_precision() == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # a T4
    assert trainer.mixed_precision() == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)    # an A100 / H100
    assert trainer.mixed_precision() == "bf16"
