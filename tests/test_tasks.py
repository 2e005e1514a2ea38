"""Alignment-task prompts, response-only loss, letter tokens and the verbalizer."""
import re
from dataclasses import replace

import pytest
import torch

from ulmrec.model import IGNORE, collate, encode
from ulmrec.prompts import LETTERS, TASKS
from ulmrec.tasks import (TaskConfig, eval_examples, random_candidates, task_inputs,
                          training_examples, user_index_strings)
from ulmrec.verbalizer import letter_token_ids, response_ids, verbalize


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ulmrec.backbone import resolve_backbone
    return AutoTokenizer.from_pretrained(resolve_backbone())


@pytest.fixture(scope="module")
def inputs(gift_cards):
    users = gift_cards.users.set_index("user")
    # a stand-in preference built from the user's own first training review (real text)
    tr = gift_cards.interactions[gift_cards.interactions["split"] == "train"]
    pref = tr.sort_values("position").groupby("user")["text"].first().str[:80]
    index = user_index_strings(gift_cards, "oid")
    assert index.index.equals(users.index)
    return task_inputs(gift_cards, index, pref, max_title_words=8)


def _titles_in(text, inp):
    return {i for i, t in inp.titles.items() if t in text}


def test_every_task_is_built_with_sampled_templates(inputs):
    cfg = TaskConfig(max_history=5)
    examples = training_examples(inputs, cfg)
    tasks = {e.task for e in examples}
    assert tasks == set(TASKS)
    nxt = [e for e in examples if e.task == "next_item"]
    assert len({e.instruction for e in nxt}) > 1          # one template sampled per example
    assert all(e.response in LETTERS and e.candidates[LETTERS.index(e.response)] == e.target
               for e in nxt)
    rating = [e for e in examples if e.task == "rating"]
    assert all(re.fullmatch(r"[1-5]", e.response) for e in rating)
    assert all("(rating: ?)" in e.input for e in rating)


def test_training_examples_never_see_validation_or_test(gift_cards, inputs):
    val, test = gift_cards.targets("val"), gift_cards.targets("test")
    train = gift_cards.sequences("train")
    examples = training_examples(inputs, TaskConfig(max_history=50, max_title_words=8))
    for ex in examples:
        held_out = {int(val[ex.user]), int(test[ex.user])}
        if ex.target is not None:
            assert ex.target in train[ex.user]
            assert not held_out & set(ex.candidates)       # held-out items are not even negatives
        if ex.task == "next_item":
            shown_history = ex.input.split("User history: ")[1].split("\nCandidates:")[0]
            # the history shows only items strictly before the target in the training sequence
            pos = train[ex.user].index(ex.target)
            allowed = set(train[ex.user][:pos])
            titles_before = {inputs.titles[i] for i in allowed}
            assert all(t in titles_before for t in shown_history.split("; "))


def test_task_switches_and_ratios(inputs):
    only_next = training_examples(inputs, TaskConfig(tasks=("next_item",), task_ratio=(1.0,)))
    assert {e.task for e in only_next} == {"next_item"}                    # = LlamaRec
    half = training_examples(inputs, TaskConfig(tasks=("next_item", "rating"), task_ratio=(1.0, 0.5)))
    n_rating = sum(e.task == "rating" for e in half)
    assert n_rating == round(len(inputs.train) * 0.5)
    with pytest.raises(ValueError, match="unknown task"):
        training_examples(inputs, TaskConfig(tasks=("bogus",), task_ratio=(1.0,)))


def test_eval_prompts_hold_out_the_target(gift_cards, inputs):
    cfg = TaskConfig(max_history=50, max_title_words=8)
    for split, upto in (("val", "train"), ("test", "val")):
        cands = random_candidates(gift_cards, split, seed=1)
        examples, frame = eval_examples(gift_cards, inputs, cands, split, cfg)
        assert len(examples) == len(frame) == gift_cards.num_users
        hist = gift_cards.sequences(upto)
        for ex in examples[:50]:
            assert ex.target == int(gift_cards.targets(split)[ex.user])
            assert ex.target not in hist[ex.user]
            assert len(ex.candidates) == 20 and len(set(ex.candidates)) == 20
    uid = eval_examples(gift_cards, inputs, cands, "test", replace(cfg, no_history=True))[0]
    assert all("User history" not in ex.input and "User index" in ex.input for ex in uid)


def test_letters_are_single_tokens_and_match_training_targets(tokenizer):
    ids = letter_token_ids(tokenizer)
    assert len(ids) == 20 and len(set(ids)) == 20
    for i, letter in enumerate(LETTERS):
        # the token the verbalizer reads is the token the training label supervises
        assert response_ids(tokenizer, letter)[0] == ids[i]
        assert tokenizer.decode([ids[i]]) == letter


def test_loss_is_on_the_response_only(tokenizer, inputs):
    ex = training_examples(inputs, TaskConfig(tasks=("next_item",), task_ratio=(1.0,)))[0]
    enc = encode(tokenizer, ex, "chat", 2048)
    resp = response_ids(tokenizer, ex.response)
    n = len(enc["input_ids"])
    assert enc["labels"][: n - len(resp)] == [IGNORE] * (n - len(resp))
    assert enc["labels"][n - len(resp):] == resp == enc["input_ids"][n - len(resp):]
    assert resp[-1] == tokenizer.eos_token_id and not enc["truncated"]
    short = encode(tokenizer, ex, "chat", 40)
    assert short["truncated"] and len(short["input_ids"]) == 40
    assert short["labels"][-len(resp):] == resp                         # the answer survives

    batch = collate([enc, short], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, n)
    assert batch["attention_mask"][1, : n - 40].sum() == 0                # left padding
    assert (batch["labels"][1, : n - 40] == IGNORE).all()


def test_index_tokens_are_single_tokens_after_adding(tokenizer):
    from transformers import AutoTokenizer

    from ulmrec.backbone import resolve_backbone
    from ulmrec.model import index_vocabulary
    tok = AutoTokenizer.from_pretrained(resolve_backbone())
    vocab = index_vocabulary()
    assert len(vocab) == 1024 and vocab[0] == "<a_0>" and vocab[-1] == "<d_255>"
    assert len(tok("<a_12><b_7>", add_special_tokens=False)["input_ids"]) > 2
    tok.add_tokens(vocab)
    assert len(tok("<a_12><b_7><c_201><d_33>", add_special_tokens=False)["input_ids"]) == 4


def test_verbalizer_on_hand_built_logits():
    logits = torch.full((2, 10), -5.0)
    letter_ids = [7, 2, 9]                    # "A" → 7, "B" → 2, "C" → 9
    logits[0, 9] = 3.0                        # row 0 prefers C
    logits[1, 7], logits[1, 2] = 1.0, 1.0     # row 1: A and B tie
    logits[:, 0] = 100.0                      # a non-letter token never counts
    scores, probs = verbalize(logits, letter_ids)
    assert scores.tolist() == [[-5.0, -5.0, 3.0], [1.0, 1.0, -5.0]]
    assert probs.sum(dim=1).allclose(torch.ones(2))
    assert probs[0].argmax() == 2 and probs[1, 0] == probs[1, 1]


def test_response_loss_equals_full_loss_on_response_tokens(tokenizer, inputs):
    from ulmrec.model import response_loss
    from ulmrec.ranker import RankerConfig, load_base
    model, tok = load_base(RankerConfig(tiny_backbone=True))
    exs = training_examples(inputs, TaskConfig(max_history=3))[:4]
    assert len({e.task for e in exs}) > 1 or len({len(e.response) for e in exs}) > 1
    batch = collate([encode(tok, e, "chat", 512) for e in exs], tok.pad_token_id)
    full = model(**batch).loss                       # transformers' loss over every position
    assert response_loss(model, batch).item() == pytest.approx(full.item(), rel=1e-5)


def test_listwise_letter_loss_scores_letter_answers_against_the_letters_only(tokenizer, inputs):
    """--loss letters: a letter answer's loss is the cross-entropy over the 20 letter logits at
    its answer position (EOS untrained); any other response keeps the token loss."""
    import torch
    from ulmrec.model import IGNORE, response_loss
    from ulmrec.ranker import RankerConfig, load_base
    from ulmrec.verbalizer import letter_token_ids
    model, tok = load_base(RankerConfig(tiny_backbone=True))
    ids = letter_token_ids(tok, 20, "chat")
    exs = training_examples(inputs, TaskConfig(max_history=3))
    letter = [e for e in exs if e.task == "next_item"][:2]
    other = [e for e in exs if e.task != "next_item"][:1]
    batch = collate([encode(tok, e, "chat", 512) for e in letter + other], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"]
    want, n = 0.0, 0
    for row in range(3):
        pos = [t for t in range(1, lab.shape[1]) if lab[row, t] != IGNORE]
        if row < 2:                                    # letter rows: one listwise term
            t = pos[0]
            want += torch.nn.functional.cross_entropy(
                logits[row, t - 1, ids][None], torch.tensor([ids.index(int(lab[row, t]))])).item()
            n += 1
        else:
            for t in pos:
                want += torch.nn.functional.cross_entropy(logits[row, t - 1][None], lab[row, t][None]).item()
                n += 1
    assert response_loss(model, batch, ids).item() == pytest.approx(want / n, rel=1e-4)
    # no letter rows: the same as the token loss
    only = collate([encode(tok, e, "chat", 512) for e in other], tok.pad_token_id)
    assert response_loss(model, only, ids).item() == pytest.approx(response_loss(model, only).item())


def test_per_example_weighting_averages_each_response_then_the_batch(tokenizer, inputs):
    """loss_weighting=example: every response counts once, whatever its length; a batch of
    one response is the same under both weightings."""
    from ulmrec.model import response_loss
    from ulmrec.ranker import RankerConfig, load_base
    from ulmrec.verbalizer import letter_token_ids
    model, tok = load_base(RankerConfig(tiny_backbone=True))
    ids = letter_token_ids(tok, 20, "chat")
    exs = training_examples(inputs, TaskConfig(max_history=3))
    mix = [e for e in exs if e.task == "next_item"][:1] + [e for e in exs if e.task != "next_item"][:2]
    enc = [encode(tok, e, "chat", 512) for e in mix]
    for letters in (None, ids):
        alone = [response_loss(model, collate([x], tok.pad_token_id), letters).item() for x in enc]
        for x, want in zip(enc, alone):
            got = response_loss(model, collate([x], tok.pad_token_id), letters, per_example=True)
            assert got.item() == pytest.approx(want, rel=1e-4)
        batch = collate(enc, tok.pad_token_id)
        assert response_loss(model, batch, letters, per_example=True).item() == \
            pytest.approx(sum(alone) / 3, rel=1e-4)
        assert response_loss(model, batch, letters).item() != pytest.approx(sum(alone) / 3, rel=1e-3)


def test_retriever_training_candidates_are_hard_and_leak_free(gift_cards, inputs):
    """train_candidates=retriever: the last training prefix gets the retriever's list in its
    order where that list holds the target; other prefixes and misses stay random."""
    import pandas as pd
    train = gift_cards.sequences("train")
    val, test = gift_cards.targets("val"), gift_cards.targets("test")
    users = [u for u, s in train.items() if len(s) >= 3][:40]
    retrieved = {}
    for k, u in enumerate(users):
        seq = train[u]
        pool = [i for i in range(1, gift_cards.num_items + 1)
                if i not in set(seq) | {int(val[u]), int(test[u])}][:19]
        # half the users: target at position k % 20; the other half: a list without it
        retrieved[u] = pool[: k % 20] + [seq[-1]] + pool[k % 20:] if k % 2 == 0 else pool + [pool[0] + 0]
    inp = replace(inputs, retrieved=pd.Series(retrieved))
    cfg = TaskConfig(tasks=("next_item",), task_ratio=(1.0,), train_candidates="retriever")
    examples = training_examples(inp, cfg)
    last = {e.user: e for e in examples if e.target == train[e.user][-1] and e.user in retrieved}
    for k, u in enumerate(users):
        ex = last[u]
        if k % 2 == 0:
            assert ex.candidates == retrieved[u]                 # retriever order kept
            assert ex.response == LETTERS[k % 20]
        else:
            assert ex.candidates != retrieved[u] and ex.target in ex.candidates   # random fallback
        assert not {int(val[u]), int(test[u])} & set(ex.candidates)
    # retriever-only: exactly the hard prompts, nothing random
    only = training_examples(inp, replace(cfg, train_candidates="retriever-only"))
    assert sorted(e.user for e in only) == sorted(u for k, u in enumerate(users) if k % 2 == 0)
    assert all(e.candidates == retrieved[e.user] and e.target == train[e.user][-1] for e in only)
    # a retriever list holding the user's own validation and test items (as lists exported
    # before the retriever masked them did): both leave, the list is topped up to 20
    leaky = {}
    for u in users[::2]:
        seq = train[u]
        pool = [i for i in range(1, gift_cards.num_items + 1)
                if i not in set(seq) | {int(val[u]), int(test[u])}][:17]
        leaky[u] = [int(test[u]), seq[-1], int(val[u])] + pool
    examples = training_examples(replace(inputs, retrieved=pd.Series(leaky)), cfg)
    last = {e.user: e for e in examples if e.target == train[e.user][-1] and e.user in leaky}
    for u in leaky:
        c = last[u].candidates
        assert len(c) == 20 and len(set(c)) == 20 and c[0] == train[u][-1]
        assert not {int(val[u]), int(test[u])} & set(c)
        assert c[1:18] == leaky[u][3:]                          # retriever order kept
    with pytest.raises(ValueError, match="retriever"):
        from ulmrec.bundle import ServeConfig
        from ulmrec.ranker import load_task_inputs
        load_task_inputs(gift_cards, ServeConfig(index_kind="none", retriever="random",
                                                 preference_source="none",
                                                 train_candidates="retriever"))


def test_a_task_is_one_registered_builder_and_ratios_default_to_all(inputs, monkeypatch):
    """A seventh task needs its builder only: the default config keeps every example of each
    task, with no ratio to list; a ratio list that does not match the tasks is an error."""
    from ulmrec import tasks as T
    from ulmrec.tasks import Example

    def echo(inp, u, cfg, rng):
        return [Example("echo", u.user, "Repeat the last title.", inp.titles[u.seq[-1]], inp.titles[u.seq[-1]])]
    monkeypatch.setitem(T.TASK_BUILDERS, "echo", echo)
    cfg = TaskConfig(tasks=("history_to_index", "echo"))
    assert cfg.task_ratio == () and T.task_ratios(cfg) == {"history_to_index": 1.0, "echo": 1.0}
    exs = training_examples(inputs, cfg)
    n_users = len(inputs.train)
    assert sum(e.task == "echo" for e in exs) == n_users == sum(e.task == "history_to_index" for e in exs)
    with pytest.raises(ValueError, match="2 tasks"):
        training_examples(inputs, replace(cfg, task_ratio=(1.0,)))
    with pytest.raises(ValueError, match="unknown task"):
        training_examples(inputs, replace(cfg, tasks=("nope",)))


def test_a_pid_index_comes_from_its_named_run_and_says_when_it_is_leak_prone(gift_cards, tmp_path,
                                                                           monkeypatch):
    """--index-run picks the train.index run (e.g. a titles-only index beside the preference
    one); an index built with the authors' preference text carries the leak-prone note."""
    import json

    import pandas as pd

    from ulmrec.bundle import ServeConfig
    from ulmrec.ranker import load_pid_table, load_task_inputs
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    users = gift_cards.users.sort_values("user")
    for run, leak, first in (("index", True, 7), ("index-titles", False, 9)):
        folder = tmp_path / gift_cards.name / run
        folder.mkdir(parents=True)
        pd.DataFrame({"user": users["user"], "reviewerID": users["reviewerID"],
                      "index": [f"<a_{first}><b_{u % 256}>" for u in users["user"]]}
                     ).to_parquet(folder / "user_index.parquet", index=False)
        (folder / "summary.json").write_text(json.dumps({"leak_prone": leak}))
    for run, first, leaky in (("index", 7, True), ("index-titles", 9, False)):
        inp, notes = load_task_inputs(gift_cards, ServeConfig(dataset=gift_cards.name, index_kind="pid",
                                                       index_run=run, preference_source="none"))
        assert inp.index.str.startswith(f"<a_{first}>").all()
        assert any("leak-prone" in n and run in n for n in notes) == leaky
    with pytest.raises(FileNotFoundError, match="--out index-other"):
        load_pid_table(gift_cards.name, "index-other")
