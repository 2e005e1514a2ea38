"""Resumable fine-tuning checkpoints: the trainable weights only (LoRA + index-token rows),
the optimizer, the scheduler and the loop's own state, one folder swapped in atomically.

A model that owns trainable tensors outside its peft wrapper (P2Rec's projection and head
around a LoRA backbone) names them itself: `model.trainable_state()` → {name: tensor}, loaded
back with `load_state_dict(strict=False)`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .paths import atomic_dir

# peft (save_checkpoint, load_checkpoint) is imported on first use: importing it costs ~10 s,
# paid only once training saves or resumes


ITEM_TOKENS = "item_tokens.proj."     # the soft item tokens' projection (ulmrec.item_tokens)
LINE_HEAD = "line_head."              # the line scorer's vector (ulmrec.line_head)


def _extra_state(model) -> dict:
    """Trained tensors that live beside the peft wrapper: the item tokens' projection and
    the line head."""
    it, head = getattr(model, "item_tokens", None), getattr(model, "line_head", None)
    sd = {} if it is None else {ITEM_TOKENS + k: v for k, v in it.proj.state_dict().items()}
    if head is not None:
        sd.update({LINE_HEAD + k: v for k, v in head.state_dict().items()})
    return sd


def read_state(folder: Path) -> dict | None:
    """The loop state of a checkpoint, or None when there is none."""
    path = Path(folder) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def save_checkpoint(folder: Path, model, optim, sched, state: dict) -> None:
    from peft import get_peft_model_state_dict

    def write(tmp: Path) -> None:
        # Without save_embedding_layers=False PEFT copies the whole resized embedding (235 MB
        # for the 135M backbone); the index rows travel as trainable-token deltas anyway.
        if hasattr(model, "trainable_state"):
            sd = model.trainable_state()
        else:
            sd = get_peft_model_state_dict(model, save_embedding_layers=False)
            sd.update(_extra_state(model))
        # clone: tied embedding / LM-head token rows share storage, which safetensors refuses
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in sd.items()},
                  tmp / "trainable.safetensors")
        torch.save(optim.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    atomic_dir(folder, write)


def load_checkpoint(folder: Path, model, optim, sched) -> dict:
    """Restore weights, optimizer and scheduler in place; returns the loop state."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    weights = load_file(folder / "trainable.safetensors")
    if hasattr(model, "trainable_state"):
        res = model.load_state_dict(weights, strict=False)
        if res.unexpected_keys:
            raise ValueError(f"{folder}: checkpoint does not fit this model: {res.unexpected_keys[:3]}")
    else:
        extra = {k: weights.pop(k) for k in list(weights) if k.startswith(ITEM_TOKENS)}
        if extra:
            model.item_tokens.proj.load_state_dict({k[len(ITEM_TOKENS):]: v for k, v in extra.items()})
        head = {k[len(LINE_HEAD):]: weights.pop(k) for k in list(weights) if k.startswith(LINE_HEAD)}
        if head:
            model.line_head.load_state_dict(head)
        set_peft_model_state_dict(model, weights)
    optim.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return read_state(folder)
