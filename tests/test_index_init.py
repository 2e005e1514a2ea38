"""Index tokens initialised from the distinctive words of their users' preferences."""
import pandas as pd
import torch

from ulmrec.index_init import code_words, init_index_rows


def test_code_words_pick_what_a_group_shares_not_what_everyone_says():
    index = pd.Series({1: "<a_0><b_0>", 2: "<a_0><b_1>", 3: "<a_1><b_0>", 4: "<a_1><b_1>"})
    texts = pd.Series({1: "The user prefers racing games and cars.",
                       2: "The user prefers racing games, fast cars.",
                       3: "The user prefers puzzle games and quiet puzzles.",
                       4: "The user prefers puzzle games with logic."})
    words = code_words(index, texts)
    assert words["<a_0>"][0][0] in ("racing", "cars") and words["<a_1>"][0][0] == "puzzle"
    assert all(w not in dict(words["<a_0>"]) for w in ("user", "prefers", "games", "the"))
    assert "<c_0>" not in words


def test_init_sets_rows_to_the_words_embedding_at_vocabulary_norm():
    class Tok:
        unk_token_id = None
        vocab = {"<a_0>": 5, "<a_1>": 6}

        def convert_tokens_to_ids(self, t):
            return self.vocab.get(t)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": {" racing": [1], " cars": [2, 3]}.get(text, [])}

    model = torch.nn.Module()
    emb = torch.nn.Embedding(7, 4)
    model.get_input_embeddings = lambda: emb
    before = emb.weight[6].clone()
    n = init_index_rows(model, Tok(), {"<a_0>": [("racing", 1.0), ("cars", 1.0)], "<a_1>": []})
    w = emb.weight.detach()
    want = (w[1] + (w[2] + w[3]) / 2) / 2
    assert n == 1
    assert torch.allclose(w[5] / w[5].norm(), want / want.norm(), atol=1e-6)
    assert torch.equal(w[6], before)      # no words: the row is left as it was
