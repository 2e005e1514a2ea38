"""One GPU check, ready before a GPU is at hand. No network, only this repository.

    python bench/gpu_check.py                    # on one CUDA GPU: < 10 min on an H100/H200
    python bench/gpu_check.py --cpu-rehearsal    # everything that needs no CUDA, < 1 min
    python bench/gpu_check.py --out gpu_check.json --skip-7b

(a) The QLoRA path on tiny random Llamas, tied and untied embeddings, through the project's
    own code (ulmrec.ranker.build_ranker / load_ranker, the trainer ulmrec.trainer.fit): NF4
    load, index tokens trainable, 20 steps, stop (checkpoint), resume to 30 == 30 straight,
    save the adapter, reload in 4-bit and in bf16, letter scores agree.
(b) Speed at real shapes with random weights (weights do not change speed): verbalizer
    throughput (users/s at batch 8 and 32, ~1k-token prompts) and one LoRA training step
    (batch 4, gradient checkpointing) at SmolLM2-135M and Llama-2-7B shapes, against the
    paper's 0.42-0.62 s/user on an A800.

NF4 needs bitsandbytes. A GPU machine without it (and without network) can take a trimmed
copy: `python bench/gpu_check.py --pack-bitsandbytes bitsandbytes-0.50.2-…whl` writes its
Python code + the CUDA 13.0 library into .bnb/ (~4.5 MB, git-ignored via .git/info/exclude),
which this script puts on sys.path. Without it the NF4 parts are skipped, said so, and the
same path runs in bf16. The tokenizer is assets/demo's (SmolLM2 + the 1,024 index tokens).
Exit 0 when every check passes (skips are not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BNB_DIR = ROOT / ".bnb"
if BNB_DIR.is_dir():
    sys.path.insert(0, str(BNB_DIR))

import torch  # noqa: E402

TOKENIZER = ROOT / "assets" / "demo"
SHAPES = {  # LlamaConfig fields of the two backbones (vocabulary: the project's tokenizer)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
PAPER_S_PER_USER = (0.42, 0.62)
WORDS = ("wireless gaming controller deluxe edition remastered bundle collector adventure racing "
         "puzzle strategy classic arcade headset keyboard charging station digital code card gift "
         "holiday birthday premium ultimate legendary story fantasy kingdom legacy").split()


def log(msg: str) -> None:
    print(msg, flush=True)


def has_bnb() -> tuple[bool, str]:
    try:
        import bitsandbytes as bnb
        return True, f"bitsandbytes {bnb.__version__}"
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA library it cannot load
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def pack_bitsandbytes(wheel: Path, cuda: str = "130") -> Path:
    """Trim a bitsandbytes wheel to its Python code + one CUDA library, into .bnb/."""
    import shutil
    if BNB_DIR.exists():
        shutil.rmtree(BNB_DIR)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            keep = (name.endswith((".py", f"_cuda{cuda}.so", "_cpu.so")) or ".dist-info/" in name)
            if keep:
                z.extract(name, BNB_DIR)
    size = sum(p.stat().st_size for p in BNB_DIR.rglob("*") if p.is_file()) / 1e6
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.bnb/" not in (exclude.read_text() if exclude.exists() else ""):
        with exclude.open("a") as f:
            f.write("/.bnb/\n")
    log(f"packed {wheel.name} → {BNB_DIR} ({size:.1f} MB, CUDA {cuda} library only)")
    return BNB_DIR


# -- synthetic prompts through the project's own prompt / verbalizer code ------------------------


def examples(n: int, titles: int = 20, words: int = 6, seed: int = 0):
    """Next-item Examples with realistic prompts (history + 20 candidate titles)."""
    import random

    from ulmrec.prompts import LETTERS, candidates_block, history_line
    from ulmrec.tasks import Example
    rng = random.Random(seed)

    def title() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).title()
    out = []
    for u in range(n):
        hist = history_line([title() for _ in range(titles)])
        cands = candidates_block([title() for _ in range(20)])
        target = rng.randrange(20)
        out.append(Example("next_item", u, "Given the user's purchase history, pick the item they "
                           "will buy next from the candidates.", f"History: {hist}\n{cands}",
                           LETTERS[target], list(range(20)), target))
    return out


def tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def llama(shape: dict, vocab: int, tok, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


# -- (a) the QLoRA path ---------------------------------------------------------------------------


def _train(model, tok, encoded, out: Path, total: int = 30, stop_after: int = 0) -> list[float]:
    """The project's own loop (ulmrec.trainer.fit) on `encoded`; the losses of this call."""
    from ulmrec.model import response_loss
    from ulmrec.trainer import TrainingArguments, fit
    args = TrainingArguments(learning_rate=2e-3, warmup_steps=2, max_steps=total, batch_size=2,
                             eval_every=0, stop_after=stop_after)
    return fit(model, encoded, args, out, loss_fn=response_loss, pad_id=tok.pad_token_id,
               seed=0, desc="qlora check")["losses"]


def _trainable(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict
    return {k: v.detach().float().cpu().clone()
            for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def _scores(model, tok, exs):
    from ulmrec.model import score_examples
    model.eval()
    _, probs = score_examples(model, tok, exs, "auto", 1024, 8, 20, progress=False)
    return probs.float()


def qlora_check(tied: bool, device: str, quant: bool, workdir: Path, small: bool = False) -> dict:
    """build (NF4 when quant) → 20 steps → checkpoint → resume to 30 == 30 straight → reload."""
    from ulmrec.model import encode
    from ulmrec.ranker import RankerConfig, build_ranker, load_ranker

    name = "tied" if tied else "untied"
    tok = tokenizer()
    base = workdir / f"tiny-{name}"
    llama({**TINY, "tie_word_embeddings": tied}, len(tok), tok, "cpu", torch.float32).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = RankerConfig(backbone=str(base), load_in_4bit=quant, lora_dropout=0.0, max_len=1024)

    def fresh():
        torch.manual_seed(0)  # the same LoRA init for both runs
        return build_ranker(cfg)

    model, tok = fresh()
    trainable_tokens = sum(p.numel() for n, p in model.named_parameters()
                           if "trainable_tokens" in n and p.requires_grad)
    rows = model.get_input_embeddings()
    quantized = any("4bit" in type(m).__name__.lower() or "Params4bit" in type(getattr(m, "weight", None)).__name__
                    for m in model.modules())
    # the rehearsal: short prompts (CPU logits over a 50k vocabulary are the cost)
    exs = examples(16, titles=1, words=1) if small else examples(32, titles=8)
    encoded = [encode(tok, ex, "auto", 1024) for ex in exs]
    t0 = time.time()
    stop, total = (4, 6) if small else (20, 30)   # the rehearsal: the same path, fewer steps
    losses = _train(model, tok, encoded, workdir / f"straight-{name}", total)
    straight = _trainable(model)
    n_score = 8 if small else 16
    probs_trained = _scores(model, tok, exs[:n_score])
    adapter = workdir / f"adapter-{name}"
    model.save_pretrained(adapter, save_embedding_layers=False)
    tok.save_pretrained(adapter)
    del model

    model, _ = fresh()
    _train(model, tok, encoded, workdir / f"cut-{name}", total, stop_after=stop)
    del model                                                  # "stop": a checkpoint at step 20
    model, _ = fresh()
    _train(model, tok, encoded, workdir / f"cut-{name}", total)  # resumes from it to 30
    resumed = _trainable(model)
    resume_diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
    del model
    train_s = time.time() - t0

    reloads = {}
    for label, four_bit in (("4bit", True), ("bf16" if device == "cuda" else "fp32", False)):
        if four_bit and not quant:
            continue
        rcfg = RankerConfig(backbone=str(base), load_in_4bit=four_bit, lora_dropout=0.0, max_len=1024)
        m, t = load_ranker(adapter, rcfg)
        p = _scores(m, t, exs[:n_score])
        reloads[label] = {"max_prob_diff": float((p - probs_trained).abs().max()),
                          "top1_agree": float((p.argmax(1) == probs_trained.argmax(1)).float().mean())}
        del m
    same = reloads.get("4bit" if quant else ("bf16" if device == "cuda" else "fp32"))
    checks = {
        "nf4_loaded": quantized if quant else None,
        "index_tokens_trainable": trainable_tokens > 0 and rows is not None,
        "loss_fell": None if small else losses[-1] < losses[0],   # 6 steps: too few to say
        # bf16 / 4-bit kernels are not bit-deterministic run to run: a small tolerance there
        "resume_matches": resume_diff < (5e-3 if device == "cuda" else 1e-5),
        "reload_matches": same["max_prob_diff"] < (2e-2 if device == "cuda" else 1e-4),
    }
    if quant:  # bf16 vs NF4 base: quantization error on a random tiny model, so a loose bound
        checks["bf16_reload_agrees"] = reloads["bf16"]["top1_agree"] >= 0.5
    return {"embeddings": name, "nf4": quant, "steps": f"{stop} → stop → resume → {total}", "trainable_token_params": trainable_tokens,
            "loss_first_last": [losses[0], losses[-1]], "resume_max_diff": resume_diff,
            "reloads": reloads, "seconds": round(train_s, 1), "checks": checks}


# -- (b) speed at real shapes ---------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def speed(shape_name: str, device: str, dtype: torch.dtype, batches=(8, 32), train_batch: int = 4,
          n_titles: int = 20, shape: dict | None = None) -> dict:
    from ulmrec.model import collate, encode, index_vocabulary, response_loss, score_examples, wrap_lora
    tok = tokenizer()
    t0 = time.time()
    model = llama(shape or SHAPES[shape_name], len(tok), tok, device, dtype)
    ids = tok.convert_tokens_to_ids(index_vocabulary())
    model = wrap_lora(model, 8, 32, 0.0, ("q_proj", "v_proj"), ids)
    params = sum(p.numel() for p in model.parameters())
    build_s = time.time() - t0
    exs = examples(max(batches) * 2 + train_batch, titles=n_titles)
    prompt_tokens = sum(len(encode(tok, e, "auto", 1536, with_response=False)["input_ids"]) for e in exs[:8]) / 8
    out = {"shape": shape_name, "params_m": round(params / 1e6, 1), "dtype": str(dtype).split(".")[-1],
           "prompt_tokens": round(prompt_tokens), "build_s": round(build_s, 1), "score": {}}
    model.eval()
    for b in batches:
        score_examples(model, tok, exs[:b], "auto", 1536, b, 20, progress=False)  # warm-up
        _sync(device)
        t = time.time()
        score_examples(model, tok, exs[: 2 * b], "auto", 1536, b, 20, progress=False)
        _sync(device)
        dt = time.time() - t
        out["score"][f"batch{b}"] = {"users_per_s": round(2 * b / dt, 2), "s_per_user": round(dt / (2 * b), 4)}
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = [encode(tok, e, "auto", 1536) for e in exs[:train_batch]]
    batch = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id).items()}
    times = []
    for _ in range(3):
        _sync(device)
        t = time.time()
        response_loss(model, batch).backward()
        optim.step()
        optim.zero_grad()
        _sync(device)
        times.append(time.time() - t)
    step = min(times[1:])
    out["train_step"] = {"batch": train_batch, "s_per_step": round(step, 3),
                         "s_per_user": round(step / train_batch, 4)}
    if device == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        torch.cuda.reset_peak_memory_stats()
    del model, optim
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def meta_params(shape_name: str, vocab: int) -> float:
    """Parameter count of a shape without allocating it (the rehearsal's check of SHAPES)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SHAPES[shape_name]))
    return sum(p.numel() for p in m.parameters()) / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-rehearsal", action="store_true", help="run what needs no CUDA (tiny shapes), < 1 min")
    p.add_argument("--skip-7b", action="store_true", help="leave out the Llama-2-7B shape")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--pack-bitsandbytes", metavar="WHEEL", default=None,
                   help="trim a bitsandbytes wheel into .bnb/ (then exit)")
    args = p.parse_args(argv)
    if args.pack_bitsandbytes:
        pack_bitsandbytes(Path(args.pack_bitsandbytes))
        return 0
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t_start = time.time()
    rehearsal = args.cpu_rehearsal
    if not rehearsal and not torch.cuda.is_available():
        log("no CUDA device: run on a GPU machine, or use --cpu-rehearsal")
        return 2
    device = "cpu" if rehearsal else "cuda"
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1))) if rehearsal else None
    bnb_ok, bnb_note = has_bnb()
    quant = device == "cuda" and bnb_ok
    res = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (rehearsal)",
           "torch": torch.__version__, "bitsandbytes": bnb_note, "qlora": [], "speed": []}
    log(f"device: {res['device']}; torch {torch.__version__}; {bnb_note}")
    if device == "cuda" and not bnb_ok:
        log("SKIP NF4: bitsandbytes is not importable here (pack a trimmed wheel with "
            "--pack-bitsandbytes, see the docstring); the QLoRA path runs in bf16 instead")
    elif rehearsal:
        log("rehearsal: the QLoRA path in fp32 on CPU (NF4 needs CUDA + bitsandbytes)")

    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        for tied in (True, False):
            r = qlora_check(tied, device, quant, Path(tmp), small=rehearsal)
            res["qlora"].append(r)
            bad = [k for k, v in r["checks"].items() if v is False]
            failed += [f"qlora/{r['embeddings']}/{k}" for k in bad]
            log(f"(a) {r['embeddings']:6s} nf4={r['nf4']!s:5s} loss {r['loss_first_last'][0]:.3f}→"
                f"{r['loss_first_last'][1]:.3f}, resume diff {r['resume_max_diff']:.2e}, reloads "
                f"{json.dumps(r['reloads'])} [{r['seconds']} s] {'OK' if not bad else 'FAILED ' + ', '.join(bad)}")

    if rehearsal:
        tok = tokenizer()
        for name in SHAPES:
            res.setdefault("shape_params_m", {})[name] = round(meta_params(name, len(tok)), 1)
        log(f"(b) shapes (meta device): {res['shape_params_m']} M parameters")
        r = speed("tiny", "cpu", torch.float32, batches=(2,), train_batch=2, n_titles=1, shape=TINY)
        res["speed"].append(r)
        log(f"(b) tiny on CPU (a dry run of the timing code): {json.dumps(r)}")
    else:
        for name in SHAPES:
            if name == "llama-2-7b" and args.skip_7b:
                continue
            r = speed(name, "cuda", torch.bfloat16)
            res["speed"].append(r)
            s_user = r["score"]["batch32"]["s_per_user"]
            log(f"(b) {name}: {json.dumps(r)}; verbalizer {s_user:.4f} s/user at batch 32 "
                f"(paper, A800: {PAPER_S_PER_USER[0]}-{PAPER_S_PER_USER[1]} s/user)")
    res["seconds"] = round(time.time() - t_start, 1)
    res["failed"] = failed
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    log(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {res['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
