"""Index → preference decoding: post-processing, the metrics on hand-built cases, the
prefix profile and the benchmark's measurement with a fake embedder (no model)."""
import numpy as np
import pandas as pd
import pytest

from ulmrec.decode import (catalogue_vocab, centroids, clean_decoded, diversity, own_retrieval,
                           prefix_fidelity, rank_of_own, retrieval_metrics, sample_negatives,
                           sentence_ends, strip_markdown, trim_sentences)

# ------------------------------------------------------------------ post-processing

BOILERPLATE = ("User preferences:\n1. **Customizable**: I can tailor my responses to meet the "
               "user's specific needs and preferences.\n2. **Customizable**: I can provide "
               "responses that are tailored to the user")


def test_markdown_list_becomes_plain_whole_sentences():
    out = clean_decoded(BOILERPLATE, finished=False, max_sentences=2)
    assert out == ("Customizable: I can tailor my responses to meet the user's specific needs "
                   "and preferences.")
    assert "*" not in out and "\n" not in out and not out.startswith("User preferences")


@pytest.mark.parametrize("raw, want", [
    ("**Bold** and __strong__ and *it* and `code`.", "Bold and strong and it and code."),
    ("## Likes\n- *Xbox 360* games\n- RPGs", "Likes: Xbox 360 games; RPGs"),
    ("[Zelda](http://x.y) fan.", "Zelda fan."),
    ("> quoted line.\n---\nnext.", "quoted line. next."),
    ("1.\n2. Second item.", "Second item."),
])
def test_strip_markdown(raw, want):
    assert strip_markdown(raw) == want


@pytest.mark.parametrize("text, finished, limit, want", [
    # the budget cut the second sentence: only the complete one stays
    ("The user likes RPGs. They also enjoy", False, 0, "The user likes RPGs."),
    # abbreviations and decimals do not end a sentence
    ("Likes games, e.g. Zelda and Vol. 2 of Halo 3.5 stars. More", False, 0,
     "Likes games, e.g. Zelda and Vol. 2 of Halo 3.5 stars."),
    # at most `limit` sentences
    ("One. Two! Three? Four.", False, 2, "One. Two!"),
    # the model ended without a full stop: whole text, punctuated
    ("The user prefers gift cards", True, 2, "The user prefers gift cards."),
    # cut before any sentence completed: the fragment reads as cut
    ("The user prefers gift cards from", False, 2, "The user prefers gift cards from…"),
    # finished with a trailing clause of ≥ 3 words after a sentence: kept, punctuated
    ("Likes Zelda. Also likes Mario games", True, 0, "Likes Zelda. Also likes Mario games."),
    ("", True, 2, ""),
])
def test_trim_sentences(text, finished, limit, want):
    assert trim_sentences(text, limit, finished) == want


def test_clean_decoded_never_ends_mid_sentence():
    for raw in [BOILERPLATE, "The user likes", "A. B c d", "**x**: y z.\n\n2."]:
        out = clean_decoded(raw, finished=False, max_sentences=2)
        assert out.endswith((".", "!", "?", "…")), out
        assert "**" not in out


def test_sentence_ends_offsets():
    text = 'He said "great game." Then left! Done'
    assert [text[:e] for e in sentence_ends(text)] == ['He said "great game."',
                                                        'He said "great game." Then left!']


# ------------------------------------------------------------------ metrics (hand-built)

def test_rank_of_own_counts_ties_against():
    own = np.array([0.9, 0.5, 0.5])
    others = np.array([[0.1, 0.2], [0.6, 0.4], [0.5, 0.1]])
    assert rank_of_own(own, others).tolist() == [1, 2, 2]
    m = retrieval_metrics(np.array([1, 2, 10, 11]))
    assert m["own_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
    assert m["own_hit1"] == 0.25 and m["own_hit10"] == 0.75


def test_own_retrieval_on_a_hand_built_case():
    # 4 users with orthogonal references; user 0's text matches its own reference, user 1's
    # matches user 2's, user 2's is halfway between its own and user 3's (a tie)
    refs = np.eye(4)
    outputs = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1] / np.sqrt(2)])
    own = np.array([0, 1, 2])
    negatives = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3]])
    m = own_retrieval(outputs, refs, own, negatives)
    # ranks 1; 4 (user 2's reference beats the own one, users 0 and 3 tie with it at 0 and
    # ties count against); 2 (tie with user 3)
    assert m["own_mrr"] == pytest.approx((1 + 1 / 4 + 1 / 2) / 3)
    assert m["own_hit1"] == pytest.approx(1 / 3)
    assert m["own_hit10"] == 1.0


def test_sample_negatives_never_picks_the_own_row():
    rng = np.random.default_rng(0)
    neg = sample_negatives(6, np.array([0, 3, 5]), 4, rng)
    assert neg.shape == (3, 4)
    for ex, row in zip([0, 3, 5], neg):
        assert ex not in row and len(set(row)) == 4
    small = sample_negatives(3, np.array([1]), 9, rng)     # only 2 others: padded with -1
    assert sorted(small[0][:2]) == [0, 2] and (small[0][2:] == -1).all()


def test_centroids_and_prefix_fidelity():
    refs = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]])
    keys, cents = centroids(refs, np.array(["x", "x", "y", "y"]))
    assert keys.tolist() == ["x", "y"]
    assert np.allclose(cents[0], [1, 0])
    assert np.allclose(np.linalg.norm(cents, axis=1), 1)
    outputs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    mine = np.array([0, 1, 1])             # the third text sits on the wrong prefix's side
    m = prefix_fidelity(outputs, cents, mine, np.array([[1], [0], [0]]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["chance"] == pytest.approx(0.5)


def test_diversity_and_boilerplate():
    vocab = catalogue_vocab(["Starbucks Gift Card", "Amazon eGift Card"], {"gift", "card"})
    assert vocab == {"starbucks", "amazon", "egift"}
    texts = ["The user prefers Starbucks.", "Customizable: I can tailor my responses.",
             "Likes Amazon.", "likes amazon."]
    m = diversity(texts, vocab)
    # the last two are the same text (case-insensitive): 3 distinct of 4
    assert m["distinct_ratio"] == pytest.approx(3 / 4)
    # boilerplate: the catalogue-free one and both duplicates
    assert m["boilerplate_share"] == pytest.approx(3 / 4)
    assert m["no_catalogue_word_share"] == pytest.approx(1 / 4)


def test_catalogue_names_flag_only_titles_the_catalogue_lacks():
    from ulmrec.decode import CatalogueNames
    titles = ["The Legend of Zelda: Twilight Princess", "Nintendo DS Lite", "Resident Evil 5",
              "Pirates of the Caribbean", "Mario Kart 8"]
    ordinary = ["the user prefers games and enjoys themed games"] * 3
    names = CatalogueNames(titles, ordinary)
    # plain words at a sentence's start, a "-themed" suffix, acronyms, plurals: no names
    assert names.unknown("Prefers Zelda and Mario-themed RPGs on the Nintendo DS.") == []
    assert names.unknown("Enjoys Resident Evil games and Mario Kart.") == []
    assert names.unknown("Prefers pirate games. Enjoys Pirates.") == []
    # a title-like name no title contains, once with a known word in front of it
    assert names.unknown("Enjoys Pirate Meerkat and Zelda.") == ["pirate meerkat"]
    assert names.unknown("Prefers Zelda Odyssey.") == ["zelda odyssey"]
    texts = ["Prefers Zelda.", "Enjoys Pirate Meerkat.", "", "Enjoys Resident Evil 5."]
    assert names.share(texts) == pytest.approx(1 / 4)


# ------------------------------------------------------------------ the profile

def _profile_index():
    from ulmrec.profile import ProfileIndex
    index = ["<a_1><b_1>", "<a_1><b_2>", "<a_1><b_2>", "<a_2><b_1>"]
    items = [[1, 2], [1, 3], [2, 3], [4]]
    titles = {1: "Zelda Breath of the Wild", 2: "Mario Kart Deluxe", 3: "Zelda Link Awakening",
              4: "Halo Reach"}
    prefs = ["Likes Nintendo.", "Likes Zelda.", None, "Likes shooters."]
    return ProfileIndex.build(index, items, titles, prefs)


def test_prefix_profile_counts_what_the_group_shares():
    prof = _profile_index()
    p = prof.profile("<a_1>")
    assert p.users == 3 and p.share == pytest.approx(0.75)
    # Zelda BotW: users 0,1; Mario: 0,2; Link's Awakening: 1,2 (ties by item id)
    assert p.titles[:3] == [("Zelda Breath of the Wild", 2), ("Mario Kart Deluxe", 2),
                            ("Zelda Link Awakening", 2)]
    assert ("zelda", 3) in p.phrases                 # all three users had a Zelda title
    assert not any(ph.startswith("halo") for ph, _ in p.phrases)
    assert p.preferences == ["Likes Nintendo.", "Likes Zelda."]     # empty ones skipped
    q = prof.profile("<a_1> <b_2>")
    assert q.prefix == "<a_1><b_2>" and q.users == 2
    assert prof.profile("<a_9>").users == 0
    text = p.text()
    assert text.startswith("3 users (75.0%)") and "Zelda Breath of the Wild (2)" in text


# ------------------------------------------------------------------ the benchmark, no model

def test_measure_ranks_a_perfect_decoder_first():
    from bench.decode import measure
    # 12 users in 3 level-a groups; reference i = a distinct word, embedded one-hot
    users = list(range(1, 13))
    index = pd.Series({u: f"<a_{(u - 1) // 4}><b_{u % 4}><c_{u}><d_0>" for u in users})
    refs = pd.Series({u: f"word{u}" for u in users})

    def embed(texts):
        vecs = []
        for t in texts:
            v = np.zeros(13)
            for w in t.split():
                if w.startswith("word"):
                    v[int(w[4:])] += 1
            v = v if v.any() else np.ones(13)
            vecs.append(v / np.linalg.norm(v))
        return np.array(vecs)

    # a perfect decoder: each prefix decodes to its group's words; the full index to the user's
    group = {k: " ".join(f"word{u}" for u in users if (u - 1) // 4 == k) for k in range(3)}
    perfect = {u: [group[(u - 1) // 4], f"word{u}", f"word{u}", f"word{u}"] for u in users}
    constant = {u: ["boilerplate text"] * 4 for u in users}
    got = measure({"model": perfect, "constant": constant}, refs, index, users, embed,
                  vocab={"word"}, negatives=5, prefix_negatives=2, seed=0, medoid=True)
    res = got["results"]
    # another member's text points at the right group, but is not the user (singletons: "")
    assert res["prefix_medoid"]["level_a_accuracy"] == 1.0
    assert res["prefix_medoid"]["own_mrr"] < 0.5
    assert res["model"]["own_mrr"] == 1.0 and res["model"]["level_a_accuracy"] == 1.0
    assert res["model"]["distinct_ratio"] == 1.0
    assert res["model"]["level_a_distinct_ratio"] == 1.0
    # a constant text ties with everything: ranked last, all boilerplate
    assert res["constant"]["own_mrr"] == pytest.approx(1 / 6)
    assert res["constant"]["distinct_ratio"] == pytest.approx(1 / 12)
    assert res["constant"]["boilerplate_share"] == 1.0
    assert got["meta"]["own_candidates"] == 6 and got["meta"]["prefixes_per_level"]["a"] == 3


def test_prefix_medoid_is_the_most_central_other_member():
    from bench.decode import prefix_medoids
    e = np.eye(4)
    # users 0-2 share <a_0>; 1 sits between 0 and 2, so it is their centre; 3 is alone
    ref_vec = np.stack([e[0], (e[0] + e[1]) / np.sqrt(2), e[1], e[3]])
    codes = [[0, 0], [0, 1], [0, 1], [1, 0]]
    best = prefix_medoids(ref_vec, codes, 2, np.array([0, 1, 3]))
    assert best[0].tolist() == [1, -1]       # level a: user 1; full index: no one else
    assert best[1, 0] in (0, 2) and best[1, 1] == 2     # never the user itself
    assert best[2].tolist() == [-1, -1]


# ------------------------------------------------------------------ the tasks that teach it

@pytest.fixture(scope="module")
def pid_inputs(gift_cards):
    from ulmrec.tasks import task_inputs
    users = gift_cards.users.set_index("user")
    index = pd.Series({u: f"<a_{u % 3}><b_{u % 5}><c_{u % 7}><d_{u}>" for u in users.index})
    pref = pd.Series({u: f"The user likes gift card {u % 3}. They buy for family {u}. "
                         f"Another long sentence about the user number {u} here." for u in users.index})
    return task_inputs(gift_cards, index, pref, max_title_words=8)


def test_defaults_build_what_they_built_before(pid_inputs):
    from ulmrec.tasks import TaskConfig, training_examples
    cfg = TaskConfig(tasks=("index_to_pref", "pref_to_index"), task_ratio=(1.0, 1.0))
    ex = training_examples(pid_inputs, cfg)
    i2p = [e for e in ex if e.task == "index_to_pref"]
    assert len(i2p) == len(pid_inputs.train)                        # one per user, full index
    assert all(e.input.count("<") == 4 for e in i2p)
    assert all(e.response == pid_inputs.preference[e.user] for e in i2p)


def test_prefix_examples_and_response_budget(pid_inputs):
    from ulmrec.tasks import TaskConfig, training_examples
    n = len(pid_inputs.train)
    cfg = TaskConfig(tasks=("index_to_pref",), task_ratio=(1.0,), index_prefix_examples=3,
                     pref_max_words=12)
    ex = training_examples(pid_inputs, cfg)
    assert len(ex) == 4 * n                                         # full index + a, ab, abc
    levels = sorted({e.input.count("<") for e in ex})
    assert levels == [1, 2, 3, 4]
    for e in ex:
        full = pid_inputs.index[e.user]
        assert full.startswith(e.input.removeprefix("User index: "))
        # whole sentences within 12 words: the first one only
        assert e.response == f"The user likes gift card {e.user % 3}." or \
            e.response == f"The user likes gift card {e.user % 3}. They buy for family {e.user}."
        assert len(e.response.split()) <= 12 and e.response.endswith(".")
    half = training_examples(pid_inputs, TaskConfig(tasks=("index_to_pref",), task_ratio=(1.0,),
                                                    index_prefix_examples=0.5))
    assert 1.3 * n < len(half) < 1.7 * n


def test_task_ratio_above_one_repeats_the_pool(pid_inputs):
    from ulmrec.tasks import TaskConfig, task_counts, training_examples
    n = len(pid_inputs.train)
    ex = training_examples(pid_inputs, TaskConfig(tasks=("index_to_pref", "pref_to_index"),
                                                  task_ratio=(2.5, 0.5)))
    counts = task_counts(ex)
    assert counts["index_to_pref"] == 2 * n + round(n / 2)
    assert counts["pref_to_index"] == round(n / 2)


# ------------------------------------------------------------------ the app's ladder

class _FakeBundle:
    """Just enough of a Bundle for app.logic.ladder: tables, a model stub, canned decoding."""

    def __init__(self):
        import torch
        from ulmrec.bundle_format import Manifest
        self.manifest = Manifest(dataset={"name": "fake"}, index_kind="pid")
        self.has_decoder = False
        codes = [(1, 1, 1, 0), (1, 2, 1, 0), (1, 2, 2, 0), (2, 1, 1, 0)]
        self.users = pd.DataFrame({
            "user": [1, 2, 3, 4], "reviewerID": ["U1", "U2", "U3", "U4"],
            "history": [[1, 2, 9], [1, 3, 9], [2, 3, 9], [4, 9]], "target": [5, 5, 5, 5],
            "preference": ["Likes Nintendo.", "Likes Zelda.", None, "Likes shooters."],
            "index": ["".join(f"<{'abcd'[k]}_{c}>" for k, c in enumerate(row)) for row in codes]})
        for k, col in enumerate("abcd"):
            self.users[col] = [row[k] for row in codes]
        self.candidates = pd.DataFrame({"user": [1, 2, 3, 4], "split": "test",
                                        "candidates": [[5, 6]] * 4})
        self.items = pd.DataFrame({"item": range(1, 10), "title": [
            "Zelda Breath of the Wild", "Mario Kart Deluxe", "Zelda Link Awakening", "Halo Reach",
            "Metroid", "Pikmin", "Kirby", "Fox", "Validation Item"]})
        self._model = torch.nn.Linear(1, 1)

    def titles(self):
        return dict(zip(self.items["item"], self.items["title"]))

    def model(self):
        return self._model, None

    def served_model(self, bf16=False, int8=False):      # as Bundle.served_model
        from ulmrec.ranker import serve_ready
        return serve_ready(*self.model(), bf16=bf16, int8=int8)

    def decode_many(self, prefixes, max_new_tokens):
        return [f"Decoded {p}." for p in prefixes]


def test_ladder_shows_each_rungs_data_profile():
    from ulmrec.app.logic import ladder, prepare, profiles
    data = prepare(_FakeBundle())
    table = ladder(data, 2)
    assert list(table["prefix"]) == ["<a_1>", "<a_1><b_2>", "<a_1><b_2><c_1>",
                                     "<a_1><b_2><c_1><d_0>"]
    assert list(table["generated preference"])[0] == "Decoded <a_1>."
    col = table["what these users share (data)"]
    # <a_1> is shared by users 1-3: all three had a Zelda title; the validation item (the
    # last history item) is not a training item and never shows
    assert "zelda (3)" in col.iloc[0] and "Validation" not in " ".join(col)
    assert col.iloc[1].startswith("top items: Zelda Link Awakening (2)")
    assert profiles(data) is profiles(data)                       # built once
    assert profiles(data).profile("<a_1>").users == table["users sharing it"].iloc[0]


# ------------------------------------------------------------------ index contrast

def test_index_contrast_matches_a_recomputed_no_index_branch():
    """Step by step, the processor's cached no-index branch gives the log-probabilities of a
    fresh forward pass over [no-index prompt + generated tokens]; the mix is
    cond + w·(cond − uncond) on the plausible tokens only."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ulmrec.decode import IndexContrast
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    negative = torch.tensor([[5, 6, 7]])
    prompt = torch.tensor([[1, 2, 3, 4], [9, 8, 3, 4]])           # [B=2, start=4]
    w, alpha = 1.5, 0.1
    proc = IndexContrast(model, negative, start=4, weight=w, plausibility=alpha)
    ids = prompt
    for step in range(3):
        scores = torch.randn(2, 50)
        got = proc(ids, scores.clone())
        full = torch.cat([negative.expand(2, -1), ids[:, 4:]], dim=1)
        with torch.no_grad():
            uncond = torch.log_softmax(model(full).logits[:, -1], dim=-1)
        cond = torch.log_softmax(scores, dim=-1)
        keep = cond >= cond.max(dim=-1, keepdim=True).values + math.log(alpha)
        assert torch.equal(torch.isfinite(got), keep)
        assert torch.allclose(got[keep], (cond + w * (cond - uncond))[keep], atol=1e-5)
        assert (keep.sum(dim=-1) < 50).all()                     # the floor dropped tokens
        ids = torch.cat([ids, got.argmax(dim=-1, keepdim=True)], dim=1)


def test_contrast_fragments_are_decoded_again_plainly(monkeypatch):
    """A text that index contrast left without one complete sentence is replaced by the plain
    greedy text of the same prompt; complete texts keep their contrast version."""
    import ulmrec.decode as dec
    calls = []

    def fake(model, tok, prompts, settings, add_special_tokens=False, negative_prompt=None):
        calls.append((list(prompts), settings.contrast))
        if settings.contrast:
            return [("Likes racing games. Owns a Wii.", False) if "a_1" in p else
                    ("Wilder's, Flavor's and Wildernumerable) autonom_", False) for p in prompts]
        return [("Likes gift cards from restaurants.", True) for _ in prompts]
    monkeypatch.setattr(dec, "generate_raw", fake)
    monkeypatch.setattr(dec, "index_prompt", lambda i, tok, fmt: f"User index: {i}")
    out = dec.decode_indices(None, None, ["<a_1>", "<a_2>"], "plain", dec.DecodeSettings())
    assert out == ["Likes racing games. Owns a Wii.", "Likes gift cards from restaurants."]
    assert calls == [(["User index: <a_1>", "User index: <a_2>"], 1.0), (["User index: <a_2>"], 0.0)]


def test_decode_settings_refuse_a_bad_contrast():
    from ulmrec.decode import DecodeSettings
    with pytest.raises(ValueError, match="contrast must be"):
        DecodeSettings(contrast=-1)
    with pytest.raises(ValueError, match="plausibility must be"):
        DecodeSettings(plausibility=0)
