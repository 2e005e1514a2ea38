"""What a bundle shows the Hub's standard tools: the base model by its Hub id, no path of the
machine that made it, and a model card whose metadata the Hub accepts and whose usage section
works with plain transformers + peft.

    clean_for_hub(folder, base_id)   adapter_config.json's base_model_name_or_path → the Hub id;
                                     absolute paths in the JSON/YAML files → repo-relative
    model_card(manifest, metrics, repo_id)   README.md: YAML metadata + body
    machine_paths(folder)            files that still name a path of this machine (push refuses)
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import EvalResult

from .paths import REPO_ROOT, cache_root, runs_root
from .report import markdown_table

# Hub ids of well-known bases → their license on the Hub (the card's `license`)
BASE_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-135M": "apache-2.0",
    "meta-llama/Llama-2-7b-hf": "llama2",
    "meta-llama/Llama-2-7b-chat-hf": "llama2",
    "google/gemma-3-270m": "gemma",
    "google/gemma-3-270m-it": "gemma",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt", ".jinja")
# the card's usage section; {repo} and {base} are filled in, and tests/test_hubcard.py runs it
USAGE = '''```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{repo}")
base = AutoModelForCausalLM.from_pretrained("{base}")
base.resize_token_embeddings(len(tok))   # room for the 1,024 index tokens, before the adapter
model = PeftModel.from_pretrained(base, "{repo}")
```'''


def is_hub_id(text: object) -> bool:
    """'owner/name' that is not a path of this machine."""
    if not isinstance(text, str) or not _HUB_ID.match(text) or text.startswith((".", "~")):
        return False
    return not Path(text).exists()


def hub_base_id(backbone_ref: dict, run_config: dict | None = None) -> str | None:
    """The base model's Hub id: the manifest's backbone id when it is one, else the
    `_name_or_path` a local backbone folder was saved from; None when there is none."""
    ref_id = backbone_ref.get("id")
    if is_hub_id(ref_id):
        return ref_id
    name = (run_config or {}).get("backbone") or ref_id
    config = Path(str(name)) / "config.json" if name else None
    if config is not None and config.is_file():
        try:
            origin = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError):
            origin = None
        if is_hub_id(origin):
            return origin
    return None


def _replacements() -> list[tuple[str, str]]:
    """(absolute path of this machine, what it reads as in a pushed file), longest first."""
    pairs = {str(REPO_ROOT): "", str(runs_root().resolve()): "runs/", str(cache_root().resolve()): "cache/",
             str(Path.home()): "~/", tempfile.gettempdir(): "", os.path.realpath(tempfile.gettempdir()): ""}
    return sorted(((k.rstrip("/"), v) for k, v in pairs.items() if k.rstrip("/")),
                  key=lambda kv: len(kv[0]), reverse=True)


def machine_roots() -> list[str]:
    """Absolute paths that only mean something on this machine, longest first."""
    return [root for root, _ in _replacements()]


def scrub_text(text: str) -> str:
    """Absolute paths of this machine → relative to the repo (runs/…, cache/…, or what follows
    the temp dir), so that a command line still reads but names no machine."""
    for root, short in _replacements():
        text = re.sub(re.escape(root) + r"(/|\b)", lambda m: short if m.group(1) else short.rstrip("/") or ".", text)
    return text


def scrub(value):
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    return value


def _indent(text: str) -> int:
    """The indent a JSON file was written with (to rewrite it the same way)."""
    m = re.search(r"\n( +)\S", text)
    return len(m.group(1)) if m else 2


def clean_for_hub(folder: Path, base_id: str | None) -> list[str]:
    """Rewrite a bundle folder's text files for the Hub (before hashing); the files changed."""
    folder = Path(folder)
    changed = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            new_data = scrub(data)
            if path.name == "adapter_config.json" and isinstance(data, dict):
                # PEFT, AutoPeftModel and the Hub read the base from here
                new_data["base_model_name_or_path"] = base_id
            if new_data == data:
                continue
            new = json.dumps(new_data, indent=_indent(text), ensure_ascii=False)
        else:
            new = scrub_text(text)
            if new == text:
                continue
        path.write_text(new)
        changed.append(path.relative_to(folder).as_posix())
    return changed


def machine_paths(folder: Path) -> dict[str, str]:
    """{file: the machine path it names} for every file of a bundle that names one."""
    folder = Path(folder)
    roots = [r.encode() for r in machine_roots()]
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hit = next((r for r in roots if r + b"/" in data or data.endswith(r)), None)
            if hit is not None:
                found[path.relative_to(folder).as_posix()] = hit.decode()
    return found


def _trained_on(tasks: tuple[str, ...] | None, residual: bool) -> str:
    """What the card says the adapter was trained on: the run's own tasks when known."""
    what = ("the user-centric alignment tasks (ULMRec)" if not tasks else
            f"the task{'s' if len(tasks) > 1 else ''} {', '.join(f'`{t}`' for t in tasks)} (ULMRec)")
    return what + (", its letter scores a residual over the retriever's" if residual else "")


def model_card(manifest, metrics: dict, repo_id: str | None, base_id: str | None = None,
               standard_tokenizer: bool = True, tasks: tuple[str, ...] | None = None,
               residual: bool = False) -> str:
    """Hub model card: YAML metadata (license, pipeline_tag, base_model, library_name peft,
    tags, model-index from the real evaluation) + what it is, its results and how to load it."""
    ds = manifest.name
    run = manifest.run
    res = metrics["results"][run]
    base = base_id or manifest.backbone.get("id", "?")
    data_name = f"Amazon {ds} (leave-one-out test)"
    evals = [EvalResult(task_type="text-ranking", task_name="Sequential recommendation (top-20 re-ranking)",
                        dataset_type=f"amazon-{ds}", dataset_name=data_name,
                        metric_type=f"{view}_{m.split('@')[0].lower()}_at_{m.split('@')[1]}",
                        metric_name=f"{view.capitalize()} {m}", metric_value=round(float(res[view][m]), 4))
             for view in ("rank", "overall") for m in ("NDCG@10", "Recall@10", "MRR@10")]
    # `datasets` is left out: the Amazon review splits are not Hub datasets (only real ids go there)
    data = ModelCardData(library_name="peft", base_model=base_id if is_hub_id(base_id) else None,
                         license=BASE_LICENSES.get(base_id or "", "other"), pipeline_tag="text-generation",
                         tags=["recommendation", "sequential-recommendation", "ulmrec", "lora", "peft"],
                         model_name=repo_id or f"ulmrec-{ds}-{run}", eval_results=evals)
    shown = (("rank", "NDCG@10"), ("overall", "NDCG@10"), ("rank", "Recall@10"))
    table = markdown_table(["system"] + [f"{view.capitalize()} {metric}" for view, metric in shown],
                           [[name] + [f"{r[view][metric]:.4f}" for view, metric in shown]
                            for name, r in metrics["results"].items()], "lrrr")
    command = scrub_text(str(metrics.get("command", "python -m train.evaluate")))
    repo = repo_id or "path/to/bundle"
    if base_id and standard_tokenizer:
        usage = ("With plain transformers + peft (the base first gets the bundle's tokenizer size: "
                 "the adapter carries the index-token rows):\n\n" + USAGE.format(repo=repo, base=base_id))
    elif base_id:
        usage = ("This bundle carries a reference to the base tokenizer (`tokenizer_ref.json`), not "
                 "its files: load it with ULMRec (below).")
    else:
        usage = "The base model has no Hub id recorded; load it from where it was trained."
    body = f"""
# ULMRec ranker for {ds}

A LoRA adapter (+ 1,024 user-index tokens) for `{base}` that re-ranks the 20 candidates of a
retriever ({manifest.retriever}) by the next-token probabilities of the letters A–T, trained on
{_trained_on(tasks, residual)}. Index kind: `{manifest.index_kind}`; preferences:
`{manifest.preference_source}`. Data: {data_name}.

## Test results ({metrics.get('test_users', '?')} users)

{table}

Made by `{command}` (ULMRec) on `{base}`.

## Use

{usage}

With ULMRec (users, candidates and prompts come with the bundle):

```python
from ulmrec.bundle import load_bundle
bundle = load_bundle("{repo}")
ranking = bundle.rank([1])[0]        # letters, titles, probabilities, retriever rank
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def card_metadata(card: str) -> dict:
    """The YAML front matter of a model card (ValueError when it has none or it is not YAML)."""
    if not card.startswith("---\n"):
        raise ValueError("the card does not start with a YAML front matter block")
    end = card.find("\n---", 4)
    if end < 0:
        raise ValueError("the card's front matter block is not closed")
    meta = yaml.safe_load(card[4:end])
    if not isinstance(meta, dict):
        raise ValueError("the card's front matter is not a YAML mapping")
    return meta


def card_code(card: str) -> str:
    """The first ```python block of the card's usage section."""
    usage = card[card.index("## Use"):]
    start = usage.index("```python\n") + len("```python\n")
    return usage[start:usage.index("```", start)]
