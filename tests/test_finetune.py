"""Fine-tuning and evaluation end to end on a tiny random Llama (real tokenizer, real data)."""
import json

import numpy as np
import pandas as pd
import pytest

from train import evaluate, finetune
from ulmrec.data import load_dataset
from ulmrec.finetune import retriever_order_ndcg
from ulmrec.model import score_examples
from ulmrec.ranker import load_base, load_candidates, load_ranker, load_task_inputs
from ulmrec.tasks import Example, eval_examples

COMMON = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random",
          "--index-kind", "oid", "--preference-source", "none", "--max-history", "3",
          "--max-title-words", "4", "--max-len", "256", "--batch-size", "2",
          "--max-train-examples", "40", "--eval-users", "8", "--lora-dropout", "0",
          "--learning-rate", "0.01", "--warmup-steps", "0"]


CFG = finetune.FinetuneConfig(tiny_backbone=True, retriever="random", index_kind="oid",
                              preference_source="none", max_history=3, max_title_words=4)


def _scores(model, tok, n=12):
    ds = load_dataset("gift-cards")
    inp, _ = load_task_inputs(ds, CFG)
    exs, _ = eval_examples(ds, inp, load_candidates(ds, CFG, "test"), "test", CFG)
    return score_examples(model.eval(), tok, exs[:n], max_len=256, progress=False)[0].numpy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    import os
    old = os.environ.get("ULMREC_RUNS")
    os.environ["ULMREC_RUNS"] = str(root)
    yield root
    if old is None:
        del os.environ["ULMREC_RUNS"]
    else:
        os.environ["ULMREC_RUNS"] = old


def test_resume_continues_exactly_and_adapter_round_trips(runs):
    assert finetune.main(COMMON + ["--run-name", "full", "--max-steps", "4", "--eval-every", "2"]) == 0
    # the same run, interrupted after step 2 and resumed
    assert finetune.main(COMMON + ["--run-name", "cut", "--max-steps", "4", "--eval-every", "2",
                                   "--stop-after", "2"]) == 0
    cut = runs / "gift-cards" / "finetune" / "cut"
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not state["done"] and not (cut / "last").exists()
    assert finetune.main(COMMON + ["--run-name", "cut", "--max-steps", "4", "--eval-every", "2"]) == 0
    full = runs / "gift-cards" / "finetune" / "full"
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["history"]) == 2
    assert 0 < summary["val_retriever_ndcg10"] <= 1
    # only the examples 4 steps of batch 2 reach are tokenized, drawn from the shuffled tasks
    assert sum(summary["examples"].values()) == 8
    assert set(summary["examples"]) <= {"next_item", "history_to_index", "rating"}
    # the adapter holds LoRA + the new token rows only, not a copy of the whole embedding
    assert (full / "last" / "adapter_model.safetensors").stat().st_size < 2_000_000
    s_full = _scores(*load_ranker(full / "last", CFG))
    s_cut = _scores(*load_ranker(cut / "last", CFG))
    np.testing.assert_allclose(s_full, s_cut, rtol=1e-4, atol=1e-5)
    # training moved the letter scores away from the untrained base (same seeded weights)
    assert not np.allclose(s_full, _scores(*load_base(CFG)), atol=1e-4)


def test_the_validation_bar_is_the_lists_own_order():
    ex = [Example("next_item", 1, "", "", "A", candidates=[5, 6, 7], target=5),
          Example("next_item", 2, "", "", "C", candidates=[5, 6, 7], target=7)]
    assert retriever_order_ndcg(ex) == pytest.approx((1 + 1 / np.log2(4)) / 2)
    assert retriever_order_ndcg([]) == 0.0


def test_init_from_starts_from_another_runs_weights(runs, tmp_path, capsys):
    full = runs / "gift-cards" / "finetune" / "full"
    if not (full / "last").exists():
        test_resume_continues_exactly_and_adapter_round_trips(runs)
    # learning rate 0: one step keeps the loaded weights, so the warm start scores as its source
    assert finetune.main(COMMON + ["--run-name", "warm", "--max-steps", "1", "--eval-every", "1",
                                   "--learning-rate", "0", "--init-from", str(full / "last")]) == 0
    warm = runs / "gift-cards" / "finetune" / "warm"
    np.testing.assert_allclose(_scores(*load_ranker(warm / "last", CFG)),
                               _scores(*load_ranker(full / "last", CFG)), rtol=1e-4, atol=1e-5)
    saved = json.loads((warm / "last" / "ulmrec_config.json").read_text())["init_from"]
    assert saved.endswith("full/last") and not saved.startswith("/")  # no machine path
    # an exception below the CLI; the CLI says it in one line and exits 2
    with pytest.raises(finetune.InitFromError, match="index_kind: 'oid' there, 'none' here"):
        finetune.train(finetune.parse_config(finetune.FinetuneConfig, COMMON + [
            "--run-name", "warm2", "--max-steps", "1", "--index-kind", "none",
            "--init-from", str(full / "last")]))
    assert finetune.main(COMMON + ["--run-name", "warm3", "--max-steps", "1",
                                   "--init-from", str(tmp_path)]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


def test_a_run_cut_from_a_longer_schedule_repeats_its_first_steps(runs):
    """--max-steps 2 --schedule-steps 4: the 4-step run's examples, rates and step-2 validation."""
    args = COMMON + ["--eval-every", "2", "--warmup-steps", "1"]
    long = finetune.train(finetune.parse_config(finetune.FinetuneConfig, args + [
        "--run-name", "sched-long", "--max-steps", "4"]))
    cut = finetune.train(finetune.parse_config(finetune.FinetuneConfig, args + [
        "--run-name", "sched-cut", "--max-steps", "2", "--schedule-steps", "4"]))
    assert sum(cut["examples"].values()) == sum(long["examples"].values()) == 8
    assert cut["lr"] == pytest.approx(long["lr"][:2])
    # the step-2 validation: the same loss and the same scores
    assert cut["history"][0] == pytest.approx(long["history"][0], rel=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_follows_its_shape_after_the_warmup(runs, schedule):
    import math
    # the later --warmup-steps 2 overrides COMMON's 0
    out = finetune.train(finetune.parse_config(finetune.FinetuneConfig, COMMON + [
        "--run-name", f"lr-{schedule}", "--max-steps", "20", "--eval-every", "20",
        "--warmup-steps", "2", "--lr-schedule", schedule]))
    lr0 = 0.01
    # the LR optimizer step k (0-based) used: a linear warmup over 2 steps (at most a tenth of
    # the run), then the shape
    want = [lr0 * k / 2 if k < 2 else
            lr0 * (0.5 * (1 + math.cos(math.pi * (k - 2) / 18)) if schedule == "cosine" else 1.0)
            for k in range(20)]
    assert out["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_evaluate_writes_rank_and_overall_table(runs, tmp_path):
    if not (runs / "gift-cards" / "finetune" / "full" / "best").exists():
        finetune.main(COMMON + ["--run-name", "full", "--max-steps", "2", "--eval-every", "2"])
    assert evaluate.main(["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random",
                          "--runs", "full", "full+uid", "--baselines", "retriever",
                          "--max-users", "16", "--fusion-val-users", "8",
                          "--results-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gift-cards.json").read_text())
    assert set(res["results"]) == {"retriever (random)", "full", "full+uid", "full + retriever prior",
                                   "full+uid + retriever prior"}
    fit = res["results"]["full + retriever prior"]["fusion"]
    assert fit["val_users"] == 8 and fit["lambda"] >= 0
    pred = pd.read_parquet(runs / "gift-cards" / "finetune" / "full" / "test_predictions.parquet")
    assert {"probs", "retriever_scores"} <= set(pred.columns)
    for r in res["results"].values():
        assert r["users"] == 16 and 0.0 <= r["rank"]["NDCG@10"] <= 1.0
        assert r["overall"]["NDCG@10"] == pytest.approx(r["rank"]["NDCG@10"] * r["retrieval_recall"])
    assert "| full+uid | Rank |" in (tmp_path / "gift-cards.md").read_text()
    with pytest.raises(FileNotFoundError, match="no trained adapter"):
        evaluate.main(["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random",
                       "--runs", "missing", "--results-dir", str(tmp_path)])


def test_index_token_rows_survive_the_small_adapter_round_trip(tmp_path):
    import torch

    from ulmrec.ranker import build_ranker
    model, tok = build_ranker(CFG)
    for name, p in model.named_parameters():
        if "trainable_tokens_delta" in name:           # as if training had moved the new rows
            torch.nn.init.normal_(p.data)
    ids = torch.tensor([[tok.convert_tokens_to_ids("<b_7>"), tok.convert_tokens_to_ids("<a_1>"), 5]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_ranker(tmp_path, CFG)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_a_4bit_base_is_prepared_for_kbit_training_only_when_training(tmp_path, monkeypatch):
    """Inference (load_ranker, the app) must not get gradient checkpointing / fp32 casts; training
    gets them with non-reentrant checkpointing. The 4-bit load itself is simulated (no CUDA)."""
    import peft
    import transformers

    from ulmrec.ranker import RankerConfig, load_base
    base, tok = load_base(RankerConfig(tiny_backbone=True))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    real = transformers.AutoModelForCausalLM.from_pretrained

    def as_4bit(*args, **kwargs):
        model = real(*args, **kwargs)
        model.is_loaded_in_4bit = True
        return model
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", as_4bit)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training",
                        lambda model, **kw: calls.append(kw) or model)
    cfg = RankerConfig(backbone=str(tmp_path / "base"))
    load_base(cfg, for_training=False)
    assert calls == []
    load_base(cfg)
    assert calls == [{"use_gradient_checkpointing": True,
                      "gradient_checkpointing_kwargs": {"use_reentrant": False}}]


def test_int8_serving_quantizes_the_decoder_in_place_and_keeps_the_ranking(runs):
    """The app's --int8: LoRA folded in, the decoder's linear layers int8 weight-only
    (torchao, not the deprecated torch.ao flow), a skipped layer and the output head fp32;
    the scores stay close to fp32 on a trained adapter."""
    import torch
    from torchao.quantization import Int8Tensor

    from ulmrec.ranker import quantize_int8
    if not (runs / "gift-cards" / "finetune" / "full" / "last").exists():
        finetune.main(COMMON + ["--run-name", "full", "--max-steps", "2", "--eval-every", "2"])
    fp32 = _scores(*load_ranker(runs / "gift-cards" / "finetune" / "full" / "last", CFG))
    model, tok = load_ranker(runs / "gift-cards" / "finetune" / "full" / "last", CFG)
    assert quantize_int8(model, skip=("down_proj",)) is model  # in place: the app keeps its object
    kinds = {name.removesuffix(".base_layer").rsplit(".", 1)[-1]: type(m.weight)
             for name, m in model.get_base_model().model.named_modules()
             if isinstance(m, torch.nn.Linear) and "lora_" not in name}
    assert kinds["q_proj"] is Int8Tensor and kinds["up_proj"] is Int8Tensor
    assert kinds["down_proj"] is torch.nn.Parameter
    assert not isinstance(model.get_base_model().lm_head.weight, Int8Tensor)
    int8 = _scores(model, tok)
    assert np.abs(int8 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.75
    quantize_int8(model, skip=("down_proj",))  # a second call changes nothing
    np.testing.assert_allclose(_scores(model, tok), int8, rtol=1e-5, atol=1e-6)
