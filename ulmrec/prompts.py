"""Instruction templates for the six alignment tasks, and how a prompt becomes text.

Wording is ours, in the spirit of the paper's Figures 2–7. Each task has several
instructions; one is sampled per training example (evaluation always uses the first).
Item *titles* stand for items everywhere, never item ids.
"""
from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase[:20]  # "A".."T": one letter per retrieved candidate
_INDEX_TOKEN = re.compile(r"<[a-z]_\d+>")

INSTRUCTIONS = {
    "next_item": [
        "Given the user index, the user's history in chronological order and a pool of "
        "candidate items, recommend the item the user will interact with next. Answer with "
        "the candidate's letter.",
        "Here are a user's index and past purchases, oldest first. Which candidate will this "
        "user choose next? Reply with its letter only.",
        "Using the user index and the purchase history, pick the most likely next item from "
        "the candidates and answer with its letter.",
    ],
    "index_to_pref": [
        "Given the user index, describe the user's preferences.",
        "What does this user like? Infer the user's preferences from the user index.",
        "Decode the user index into a short statement of the user's preferences.",
    ],
    "pref_to_index": [
        "Given the user's preferences, predict the user index.",
        "Which user index belongs to a user with these preferences?",
        "Map the preference statement to the user's index.",
    ],
    "history_to_index": [
        "Given the user's interaction history in chronological order, predict the user index.",
        "These are a user's past purchases, oldest first. What is the user's index?",
        "Identify the user index from the user's purchase history.",
    ],
    "rating": [
        "Given the user index, the user's preferences and past items with their ratings, "
        "predict the rating (1 to 5) of the last item.",
        "Predict how this user rates the last item on a 1-5 scale, from the user index, "
        "preferences and rating history.",
        "From the user's index, preferences and earlier ratings, estimate the star rating "
        "(1-5) the user gives the last item.",
    ],
    "intent": [
        "Given the user's preferences, select the candidate item that best matches the "
        "user's interests. Answer with the candidate's letter.",
        "Decode what this user is looking for from the preferences and pick the matching "
        "candidate. Reply with its letter only.",
        "Based on the stated preferences, which candidate would the user most likely want? "
        "Answer with its letter.",
    ],
}
TASKS = tuple(INSTRUCTIONS)


def shorten(title: str, max_words: int) -> str:
    words = title.split()
    return title if len(words) <= max_words else " ".join(words[:max_words]) + "…"


def history_line(titles: list[str]) -> str:
    return "User history: " + "; ".join(titles)


def candidates_block(titles: list[str]) -> str:
    if len(titles) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} candidates, got {len(titles)}")
    return "Candidates:\n" + "\n".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(titles))


PROMPT_FORMATS = ("auto", "chat", "plain", "alpaca")


def resolve_format(fmt: str, tokenizer=None) -> str:
    """The concrete format of a prompt: 'auto' (and 'chat') use the tokenizer's chat template
    when it has one (instruct backbones), else the plain format (base backbones such as
    gemma3-270m); 'plain' and 'alpaca' are explicit overrides."""
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format '{fmt}' ({' | '.join(PROMPT_FORMATS)})")
    if fmt in ("auto", "chat"):
        return "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "plain"
    return fmt


def adds_special_tokens(fmt: str, tokenizer=None) -> bool:
    """Whether the tokenizer's own special tokens (BOS) go in front of a prompt: a chat
    template writes its own; the plain and alpaca wrappers need them (Gemma needs its <bos>)."""
    return resolve_format(fmt, tokenizer) != "chat"


def response_text(response: str, fmt: str, tokenizer=None) -> str:
    """A response as it follows the prompt. After the plain format's 'Answer:' running text
    puts a space, so the answer letter is the word-start token ('Answer: B' → '▁B'), the form
    the backbone's prior already uses; a chat turn or alpaca's '### Response:' line ends in a
    newline, and the answer follows directly. A response that starts with an index token
    (<a_12>…) follows directly in every format: added tokens carry no word-start marker."""
    if (resolve_format(fmt, tokenizer) == "plain" and response
            and not _INDEX_TOKEN.match(response)):
        return " " + response
    return response


def render(instruction: str, input_text: str, tokenizer=None, fmt: str = "auto") -> str:
    """The prompt text up to where the response starts.

    'chat' uses the tokenizer's chat template (instruct backbones); 'plain' is the
    'Instruction: / Input: / Answer:' wrapper for base backbones; 'alpaca' is the
    '### Instruction / ### Input / ### Response:' wrapper that LlamaRec and ULMRec used.
    'auto' picks chat or plain by the tokenizer (resolve_format).
    """
    fmt = resolve_format(fmt, tokenizer)
    if fmt == "chat":
        messages = [{"role": "user", "content": f"{instruction}\n\n{input_text}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if fmt == "plain":
        return f"Instruction: {instruction}\nInput: {input_text}\nAnswer:"
    return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"


# ------------------------------------------------------------------ sentences

_ABBREV = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "st", "no", "vol", "approx",
           "inc", "ltd", "co", "jr", "sr"}
# a sentence end: . ! ? (or …) possibly followed by a closing quote/bracket, then space or end
_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s|$)")


def sentence_ends(text: str) -> list[int]:
    """Character offsets just after each complete sentence ('e.g.', 'Vol.' do not end one)."""
    ends = []
    for m in _END.finditer(text):
        word = re.search(r"([A-Za-z][A-Za-z.]*)$", text[: m.start()])
        if m.group().startswith(".") and word and word.group(1).lower().rstrip(".") in _ABBREV:
            continue
        ends.append(m.end())
    return ends
