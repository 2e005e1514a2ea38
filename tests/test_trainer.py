"""The one training loop (ulmrec.trainer.fit) gives the numbers the loops it replaced gave.

The pinned values were printed by the ranker's and LC-Rec's own loops (train/finetune.py and
train/lcrec.py before both moved onto `fit`) for exactly these tiny runs, on this project's
CPU machine: dropout on, gradient accumulation 2, warm-up, validation and checkpoints every
few steps. A change to the loop that moves any of them is a change of behaviour."""
import json

import pytest

BEFORE_RANKER = {
    "val_ndcg10": [0.295329538413604, 0.25770078895560633],
    "loss": [10.833026885986328, 10.716178894042969],
    "lr": [0.0, 0.01, 0.008, 0.006, 0.004, 0.002],
    "test_rank_ndcg10": 0.3181189863765613, "test_rank_mrr10": 0.22534722222222223,
}
BEFORE_LCREC_LOSSES = [10.8522, 10.8215, 10.8615, 10.6802, 10.8609, 10.681]


@pytest.fixture
def one_thread(monkeypatch, tmp_path):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    yield tmp_path
    torch.set_num_threads(threads)


def test_ranker_run_reproduces_the_old_loop(one_thread):
    from train import evaluate, finetune
    data = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random",
            "--index-kind", "oid", "--preference-source", "none", "--max-history", "3",
            "--max-title-words", "4", "--max-len", "256"]
    s = finetune.train(finetune.parse_config(finetune.FinetuneConfig, data + [
        "--batch-size", "2", "--max-train-examples", "40", "--eval-users", "8",
        "--lora-dropout", "0.1", "--learning-rate", "0.01", "--warmup-steps", "2",
        "--grad-accum", "2", "--run-name", "g", "--max-steps", "6", "--eval-every", "3"]))
    assert [h["NDCG@10"] for h in s["history"]] == pytest.approx(BEFORE_RANKER["val_ndcg10"], abs=1e-9)
    assert [h["loss"] for h in s["history"]] == pytest.approx(BEFORE_RANKER["loss"], rel=1e-5)
    assert s["lr"] == pytest.approx(BEFORE_RANKER["lr"], abs=1e-12)
    out = one_thread / "results"
    assert evaluate.main(data + ["--runs", "g", "--baselines", "retriever", "--max-users", "40",
                                 "--results-dir", str(out)]) == 0
    rank = json.loads((out / "gift-cards.json").read_text())["results"]["g"]["rank"]
    assert rank["NDCG@10"] == pytest.approx(BEFORE_RANKER["test_rank_ndcg10"], abs=1e-9)
    assert rank["MRR@10"] == pytest.approx(BEFORE_RANKER["test_rank_mrr10"], abs=1e-9)


def test_lcrec_run_reproduces_the_old_loop(one_thread):
    from train import lcrec
    assert lcrec.main(["--dataset", "gift-cards", "--tiny-backbone", "--index-epochs", "5",
                       "--max-steps", "6", "--batch-size", "2", "--prompt-format", "alpaca",
                       "--max-history", "5", "--preference-source", "none", "--ckpt-every", "2",
                       "--learning-rate", "0.01", "--stages", "index", "finetune"]) == 0
    state = one_thread / "runs" / "gift-cards" / "lcrec" / "finetune" / "checkpoint" / "state.json"
    assert json.loads(state.read_text())["losses"] == pytest.approx(BEFORE_LCREC_LOSSES, abs=2e-4)


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(one_thread):
    """ckpt_every: a run killed between validations loses at most that many steps, and the
    resumed run ends with the straight run's losses."""
    import torch

    from ulmrec.checkpoint import read_state
    from ulmrec.trainer import TrainingArguments, fit

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = torch.nn.Linear(3, 1)

        def trainable_state(self):                         # what ulmrec.checkpoint saves
            return dict(self.named_parameters())

    rows = [{"x": [float(i), 1.0, -float(i)], "y": float(i % 3)} for i in range(24)]
    collate = lambda rs: {"x": torch.tensor([r["x"] for r in rs]), "y": torch.tensor([r["y"] for r in rs])}  # noqa: E731
    args = TrainingArguments(learning_rate=0.01, max_steps=10, batch_size=4, warmup_steps=0,
                             eval_every=0, ckpt_every=3)

    def loss(model, batch, kill_at=None, seen=[0]):
        seen[0] += 1
        if kill_at is not None and seen[0] > kill_at:
            raise KeyboardInterrupt                        # the machine goes away mid-run
        return ((model.w(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

    straight = fit(Toy(), rows, args, one_thread / "a", loss_fn=loss, collate_fn=collate)["losses"]
    with pytest.raises(KeyboardInterrupt):
        fit(Toy(), rows, args, one_thread / "b", collate_fn=collate,
            loss_fn=lambda m, b, s=[0]: loss(m, b, kill_at=7, seen=s))
    assert read_state(one_thread / "b" / "checkpoint")["step"] == 6      # steps 7.. were lost
    resumed = fit(Toy(), rows, args, one_thread / "b", loss_fn=loss, collate_fn=collate)["losses"]
    assert resumed == pytest.approx(straight)


def test_a_run_cut_from_a_longer_schedule_takes_its_first_steps(one_thread):
    """schedule_steps: 4 steps of a 10-step schedule are the long run's first 4 (learning
    rates and losses), not a 4-step schedule of their own; a schedule shorter than the run
    is an error."""
    import torch

    from ulmrec.trainer import TrainingArguments, fit

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = torch.nn.Linear(2, 1)

        def trainable_state(self):
            return dict(self.named_parameters())

    rows = [{"x": [float(i), 1.0], "y": float(i % 2)} for i in range(40)]
    collate = lambda rs: {"x": torch.tensor([r["x"] for r in rs]), "y": torch.tensor([r["y"] for r in rs])}  # noqa: E731
    loss = lambda m, b: ((m.w(b["x"]).squeeze(-1) - b["y"]) ** 2).mean()  # noqa: E731
    base = dict(learning_rate=0.01, batch_size=4, warmup_steps=2, eval_every=0, ckpt_every=0)
    long = fit(Toy(), rows, TrainingArguments(max_steps=10, **base), one_thread / "long",
               loss_fn=loss, collate_fn=collate)
    cut = fit(Toy(), rows, TrainingArguments(max_steps=4, schedule_steps=10, **base),
              one_thread / "cut", loss_fn=loss, collate_fn=collate)
    own = fit(Toy(), rows, TrainingArguments(max_steps=4, **base), one_thread / "own",
              loss_fn=loss, collate_fn=collate)
    assert cut["lr"] == pytest.approx(long["lr"][:4])
    assert cut["losses"] == pytest.approx(long["losses"][:4])
    assert own["lr"][3] < cut["lr"][3]            # its own 4-step schedule decays faster
    with pytest.raises(ValueError, match="schedule-steps 3"):
        fit(Toy(), rows, TrainingArguments(max_steps=4, schedule_steps=3, **base),
            one_thread / "short", loss_fn=loss, collate_fn=collate)
