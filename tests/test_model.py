"""Batched letter scoring with a shared prompt prefix: the same logits as each row alone."""
import pytest
import torch

from ulmrec.model import MIN_SHARED, common_prefix, last_logits_shared_prefix


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def _gemma3():
    # Gemma 3 mixes sliding-window and global layers: a window shorter than the rows checks
    # that the padding between prefix and own tokens does not shift what a window sees
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"]))


def test_common_prefix_leaves_every_row_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix([[1, 2], [1, 2, 3]]) == 1          # the shorter row keeps its last token
    assert common_prefix([[5, 1], [6, 1]]) == 0


@pytest.mark.parametrize("make", [_llama, _gemma3])
def test_shared_prefix_logits_equal_each_row_alone(make):
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, 60, (MIN_SHARED + 4,), generator=g).tolist()
    rows = [prefix + torch.randint(1, 60, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    with torch.no_grad():
        got = last_logits_shared_prefix(model, rows, pad_id=0)
        alone = torch.cat([model(torch.tensor([r])).logits[:, -1] for r in rows])
    assert got.shape == (4, 60)
    assert torch.allclose(got, alone, atol=1e-4)
    with torch.no_grad():                                   # too short to share: plain path
        assert last_logits_shared_prefix(model, [r[-MIN_SHARED:] for r in rows], 0) is None
