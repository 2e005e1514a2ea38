"""The line scorer: each candidate read at the end of its own line, trained and served alike."""
import json

import numpy as np
import pytest
import torch

from ulmrec.line_head import LineHead, line_ends, line_scores
from ulmrec.model import collate, encode, response_loss, score_examples
from ulmrec.prompts import render


@pytest.fixture(scope="module")
def tiny(gift_cards):
    from ulmrec.finetune import FinetuneConfig
    from ulmrec.ranker import build_ranker, load_candidates, load_task_inputs
    from ulmrec.tasks import eval_examples
    cfg = FinetuneConfig(dataset="gift-cards", tiny_backbone=True, retriever="random",
                         index_kind="oid", preference_source="none", max_history=3,
                         max_title_words=4, scorer="lines", lora_dropout=0.0)
    inp, _ = load_task_inputs(gift_cards, cfg)
    exs, _ = eval_examples(gift_cards, inp, load_candidates(gift_cards, cfg, "test"), "test", cfg)
    model, tok = build_ranker(cfg, gift_cards, inp)
    return model, tok, exs[:3]


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_line_ends_point_at_each_titles_last_token(tiny, fmt):
    _, tok, exs = tiny
    ex = exs[0]
    prompt = render(ex.instruction, ex.input, tok, fmt)
    enc = encode(tok, ex, fmt, 4096, with_response=False, lines=True)
    lines = ex.input.rpartition("Candidates:\n")[2].split("\n")
    assert len(enc["lines"]) == len(lines) == len(ex.candidates) == 20
    assert enc["answer"] == ex.candidates.index(ex.target)
    ids = enc["input_ids"]
    for line, e in zip(lines, enc["lines"]):
        upto = tok.decode(ids[:e + 1])
        # the prompt up to that token ends with the line (a merged trailing newline aside)
        assert upto.rstrip("\n").endswith(line.rstrip()), (line, upto[-40:])
        assert not tok.decode(ids[:e]).rstrip("\n").endswith(line.rstrip())
    assert prompt.count("Candidates:\n") == 1


def test_a_fresh_head_scores_flat_and_padding_moves_nothing(tiny):
    model, tok, exs = tiny
    scores, probs = score_examples(model, tok, exs, max_len=512, progress=False)
    assert torch.count_nonzero(scores) == 0          # zero vector: the residual starts at its retriever
    torch.manual_seed(0)
    with torch.no_grad():
        model.line_head.weight.normal_()
    one = torch.cat([score_examples(model, tok, [e], max_len=512, progress=False)[0] for e in exs])
    batched, probs = score_examples(model, tok, exs, max_len=512, batch_size=3, progress=False)
    torch.testing.assert_close(batched, one, atol=1e-4, rtol=1e-4)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    # by hand: the unpadded prompt's decoder state at each line end, times the vector
    enc = encode(tok, exs[1], "auto", 512, with_response=False, lines=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        h = model.get_base_model().get_decoder()(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(batched[1], h[enc["lines"]] @ model.line_head.weight,
                               atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model.line_head.weight.zero_()


def test_the_loss_is_the_listwise_cross_entropy_of_the_served_sum(tiny):
    model, tok, exs = tiny
    torch.manual_seed(1)
    with torch.no_grad():
        model.line_head.weight.normal_()
    rows = [encode(tok, e, "auto", 512, lines=True) for e in exs]
    prior = [[float(20 - j) for j in range(20)] for _ in exs]
    for r, p in zip(rows, prior):
        r["prior"] = p
    batch = collate(rows, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        got = response_loss(model, batch, residual_weight=0.7, per_example=True)
        s = line_scores(model, batch["input_ids"], batch["attention_mask"], batch["lines"])
        want = torch.nn.functional.cross_entropy(
            s + 0.7 * torch.log_softmax(torch.tensor(prior), dim=1), batch["answer"])
        served, _ = score_examples(model, tok, exs, max_len=512, batch_size=3, progress=False)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(s, served, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model.line_head.weight.zero_()


# a tiny residual run of the line scorer on the validation lists (after tiny_run's data flags)
LINE_RUN = ["--tasks", "next_item", "--task-ratio", "1", "--loss", "letters",
            "--train-candidates", "validation", "--shuffle-hard", "--residual",
            "--residual-weight", "1.5", "--scorer", "lines", "--batch-size", "2",
            "--eval-every", "2", "--eval-users", "4", "--lora-dropout", "0", "--warmup-steps", "0"]


def test_a_line_scored_run_trains_resumes_and_evaluates(tmp_path, monkeypatch):
    """A residual run with the line scorer on the validation lists: its head trains (off zero),
    travels in best/ and in the checkpoint, reloads for evaluation, and the evaluation ranks by
    it; the validation sample never trains."""
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    from tiny_run import RESIDUAL_DATA as data, train_tiny_retriever
    from train import evaluate, finetune
    train_tiny_retriever()
    train = data + LINE_RUN + ["--learning-rate", "0.01"]
    assert finetune.main(train + ["--run-name", "straight", "--max-steps", "4"]) == 0
    assert finetune.main(train + ["--run-name", "split", "--max-steps", "4", "--stop-after", "2"]) == 0
    assert finetune.main(train + ["--run-name", "split", "--max-steps", "4"]) == 0
    runs = tmp_path / "gift-cards" / "finetune"
    heads = {n: LineHead.load(runs / n / "last").weight for n in ("straight", "split")}
    assert torch.count_nonzero(heads["straight"]) > 0
    torch.testing.assert_close(heads["split"], heads["straight"])
    saved = json.loads((runs / "straight" / "best" / "ulmrec_config.json").read_text())
    assert saved["scorer"] == "lines" and saved["train_candidates"] == "validation"
    out = tmp_path / "results"
    assert evaluate.main(data + ["--runs", "straight", "--baselines", "retriever",
                                 "--max-users", "100", "--results-dir", str(out)]) == 0
    results = json.loads((out / "gift-cards.json").read_text())["results"]
    alone = results["straight (LLM term alone)"]
    assert alone["rank"]["NDCG@10"] != results["straight"]["rank"]["NDCG@10"]
    import pandas as pd
    pred = pd.read_parquet(runs / "straight" / "test_predictions.parquet")
    llm = np.stack(pred["llm_probs"].map(np.asarray))
    assert llm.std(axis=1).mean() > 0                 # a trained head, not the flat start
    # the bundle carries the head and serves by it: its probabilities are the evaluation's
    from train import export
    from ulmrec.bundle import load_bundle
    assert export.main(["--dataset", "gift-cards", "--run-name", "straight", "--results-dir",
                        str(out), "--out", str(tmp_path / "b"), "--no-include-data"]) == 0
    bundle = load_bundle(tmp_path / "b")
    users = pred["user"].head(2).tolist()
    ranked = bundle.rank(users, batch_size=2)
    for user, r in zip(users, ranked):
        want = pred.set_index("user").at[user, "probs"]
        got = r.set_index("item")["prob"].reindex(pred.set_index("user").at[user, "candidates"])
        np.testing.assert_allclose(got.to_numpy(), want, atol=1e-4)


def test_the_line_head_learns_at_its_own_rate(tmp_path, monkeypatch):
    """--line-head-lr gives the head its own AdamW group: with the LoRA's rate at 0 the head
    leaves zero while every LoRA B matrix stays at its zero start, and a resumed run replays
    the straight one (the two groups travel in the checkpoint)."""
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    from safetensors.torch import load_file
    from tiny_run import RESIDUAL_DATA as data, train_tiny_retriever
    from train import finetune
    train_tiny_retriever()
    train = data + LINE_RUN + ["--learning-rate", "0", "--line-head-lr", "0.01", "--max-steps", "4"]
    assert finetune.main(train + ["--run-name", "straight"]) == 0
    assert finetune.main(train + ["--run-name", "split", "--stop-after", "2"]) == 0
    assert finetune.main(train + ["--run-name", "split"]) == 0
    runs = tmp_path / "gift-cards" / "finetune"
    heads = {n: LineHead.load(runs / n / "last").weight for n in ("straight", "split")}
    assert torch.count_nonzero(heads["straight"]) > 0
    torch.testing.assert_close(heads["split"], heads["straight"])
    lora = load_file(str(runs / "straight" / "last" / "adapter_model.safetensors"))
    b = [t for k, t in lora.items() if "lora_B" in k]
    assert b and all(torch.count_nonzero(t) == 0 for t in b)
    with pytest.raises(ValueError, match="line-head-lr"):
        finetune.main(train[:train.index("--scorer")] + train[train.index("--scorer") + 2:]
                      + ["--run-name", "letters"])
