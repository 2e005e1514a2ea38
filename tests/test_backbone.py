"""Named backbones, prompt formats per backbone, the letter pin per backbone, tokenizer references."""
import json

import pytest

from ulmrec import backbone as bb
from ulmrec.model import encode
from ulmrec.prompts import LETTERS, adds_special_tokens, render, resolve_format
from ulmrec.tasks import Example
from ulmrec.verbalizer import letter_token_ids, response_ids

BACKBONES = list(bb.BACKBONES)


def _tokenizer(name):
    try:
        bb.require_installed(name)
    except FileNotFoundError as e:
        pytest.skip(f"{name}: {e}")
    return bb.base_tokenizer(name)


@pytest.fixture(scope="module", params=BACKBONES)
def named(request):
    return request.param, _tokenizer(request.param)


def test_names_aliases_and_ids():
    assert bb.canonical(None) == bb.DEFAULT_BACKBONE == "smollm2-135m"
    assert bb.canonical("smollm2-135m-instruct") == "smollm2-135m"     # the former name still works
    assert bb.canonical("Gemma3-270M") == "gemma3-270m"
    assert bb.canonical("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert not bb.is_embedded("some/where") and bb.is_embedded("smollm2-135m-instruct")
    # caches keyed by the backbone's name stay valid across the rename
    assert bb.backbone_name(None) == bb.backbone_name("smollm2-135m") == "smollm2-135m-instruct"
    assert bb.resolve_backbone("smollm2-135m-instruct") == bb.resolve_backbone(None)
    assert bb.resolve_backbone("/some/local/path") == "/some/local/path"
    with pytest.raises(KeyError):
        bb.spec("llama")


def test_prompt_format_follows_the_tokenizer(named):
    name, tok = named
    has_template = bool(tok.chat_template)
    assert resolve_format("auto", tok) == ("chat" if has_template else "plain")
    assert resolve_format("chat", tok) == resolve_format("auto", tok)   # no template: plain
    assert resolve_format("plain", tok) == "plain" and resolve_format("alpaca", tok) == "alpaca"
    assert name != "gemma3-270m" or resolve_format("auto", tok) == "plain"  # a base model
    text = render("Pick one.", "Candidates:\n(A) x", tok, "plain")
    assert text.startswith("Instruction: Pick one.\nInput: ") and text.endswith("\nAnswer:")
    ids = tok(text, add_special_tokens=adds_special_tokens("plain", tok))["input_ids"]
    if name == "gemma3-270m":
        assert ids[0] == tok.bos_token_id                                  # Gemma needs its <bos>
    with pytest.raises(ValueError, match="unknown prompt format"):
        resolve_format("llama", tok)


@pytest.mark.parametrize("fmt", ["auto", "plain", "alpaca"])
def test_letter_pin_per_backbone_and_format(named, fmt):
    """The verbalizer reads exactly the token that training supervises, in the form the
    backbone itself writes after that prompt (its prior): 'Answer: B' → '▁B' in the plain
    format, a bare 'B' after a chat turn's or alpaca's newline."""
    name, tok = named
    ids = letter_token_ids(tok, fmt=fmt)
    assert len(ids) == 20 and len(set(ids)) == 20
    concrete = resolve_format(fmt, tok)
    for i, letter in enumerate(LETTERS):
        ex = Example("next_item", 1, "Pick the next item.", "Candidates:\n(A) a\n(B) b", letter)
        enc = encode(tok, ex, fmt, 512)
        resp = response_ids(tok, letter, fmt)
        assert resp[0] == ids[i] and len(resp) == 2 and resp[-1] == tok.eos_token_id
        # the supervised token is the first labelled one, right after the prompt
        first = next(j for j, lab in enumerate(enc["labels"]) if lab != -100)
        assert enc["labels"][first] == enc["input_ids"][first] == ids[i]
        # ...and the backbone tokenizes prompt + answer as running text the same way
        prompt = render(ex.instruction, ex.input, tok, fmt)
        whole = tok(prompt + tok.decode([ids[i]]),
                    add_special_tokens=adds_special_tokens(fmt, tok))["input_ids"]
        assert whole == enc["input_ids"][:first + 1]
        assert tok.decode([ids[i]]) == (" " + letter if concrete == "plain" else letter)


@pytest.mark.parametrize("name", BACKBONES)
def test_tokenizer_reference_round_trip(name, tmp_path):
    from ulmrec.model import index_vocabulary
    tok = _tokenizer(name)
    vocab = index_vocabulary()
    tok.add_tokens(vocab)
    folder = tmp_path / "adapter"
    bb.save_tokenizer(tok, folder, name)
    assert sorted(p.name for p in folder.iterdir()) == [bb.TOKENIZER_REF]   # no copy of the base
    ref = json.loads((folder / bb.TOKENIZER_REF).read_text())
    assert ref["base"] == name and len(ref["added_tokens"]) == len(vocab)
    assert (folder / bb.TOKENIZER_REF).stat().st_size < 100_000
    back = bb.load_tokenizer(folder)
    text = "User index: <a_12><b_7><c_0><d_255>\nAnswer: B"
    assert len(back) == len(tok) and back.pad_token == tok.pad_token
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.chat_template == tok.chat_template
    # a folder that carries its own tokenizer (older bundles) loads it as before
    full = tmp_path / "full"
    tok.save_pretrained(full)
    assert bb.load_tokenizer(full)(text)["input_ids"] == tok(text)["input_ids"]
    # a different base tokenizer is refused, not silently mis-numbered
    other = [b for b in BACKBONES if b != name]
    if other:
        try:
            wrong = _tokenizer(other[0])
        except pytest.skip.Exception:
            return
        with pytest.raises(ValueError, match="base tokenizer"):
            bb.load_tokenizer(folder, base_tok=wrong)


def test_embedded_reference_names_package_and_hash(named):
    name, _ = named
    ref = bb.embedded_reference(name)
    assert ref["source"] == "embedded" and ref["name"] == name and len(ref["sha256"]) == 64
    assert ref["id"] == bb.spec(name).hub_id and "==" in ref["package"]
