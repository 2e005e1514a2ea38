"""LC-Rec (Zheng et al., ICDE 2024): learned item indices, alignment tasks, and generative
recommendation over the whole catalogue with a prefix trie of valid item indices."""
from .generate import generate_topn, recommend
from .item_index import build_item_index, item_texts
from .tasks import LcRecData, eval_examples, lcrec_data, training_examples
from .trie import build_trie, item_token_ids

__all__ = ["generate_topn", "recommend", "build_item_index", "item_texts", "LcRecData",
           "eval_examples", "lcrec_data", "training_examples", "build_trie", "item_token_ids"]
