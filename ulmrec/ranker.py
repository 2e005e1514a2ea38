"""Assemble the ranker: its inputs (index, preferences, candidates) and its model.

One place that knows where the earlier stages leave their outputs under runs/<dataset>/,
so fine-tuning, evaluation and the app read them the same way.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .backbone import load_tokenizer, resolve_backbone
from .data import DataConfig
from .data.release import RELEASE_INDEX_NOTE
from .index_init import code_words, init_index_rows
from .item_tokens import ItemTokens
from .line_head import LineHead
from .model import add_index_tokens, index_vocabulary, wrap_lora
from .paths import is_offline, runs_root
from .preferences import load_preferences, release_coverage, release_preferences
from .prompts import PROMPT_FORMATS
from .tasks import TaskInputs, random_candidates, task_inputs, user_index_strings

log = logging.getLogger(__name__)




@dataclass
class RankerConfig:
    """The ranker's data sources and model."""
    dataset: str = field(default="gift-cards", metadata={"help": "dataset name or folder"})
    backbone: str | None = field(default=None, metadata={
        "help": "smollm2-135m (default) | gemma3-270m (packaged backbones) | any HF path/id"})
    tiny_backbone: bool = field(default=False, metadata={
        "help": "a tiny randomly initialised Llama with the default tokenizer (tests, smoke runs)"})
    prompt_format: str = field(default="auto", metadata={
        "help": "auto (the chat template when the tokenizer has one, else plain) | chat | plain | alpaca",
        "choices": PROMPT_FORMATS})
    preference_source: str = field(default="auto", metadata={
        "help": "auto (authors' text where the dataset has it, else the preferences stage), "
                "release, local, openai, extractive, none"})
    retriever: str = field(default="lrurec", metadata={
        "help": "retrieval run whose top-20 are the val/test candidates, or 'random'"})
    index_tokens: bool = field(default=True, metadata={
        "help": "add <a_*>..<d_*> as new tokens (else an index is plain sub-word text)"})
    index_init: str = field(default="mean", metadata={
        "choices": ("mean", "words"),
        "help": "new index-token rows: mean = around the mean embedding (all alike); words = "
                "the embedding of the words that set each code's users apart (ulmrec/index_init.py)"})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: NF4 base weights (CUDA only)"})
    residual: bool = field(default=False, metadata={
        "help": "ULMRec as a residual over its retriever: the 20 letter logits plus w · the "
                "log-softmax of the retriever's scores, trained (letters loss) and served as "
                "one, so that the LLM learns only what the retriever gets wrong"})
    residual_weight: float | None = field(default=None, metadata={
        "help": "w of --residual; unset = fitted before training by maximum likelihood on the "
                "validation lists that hold their target (the retriever's own calibration), "
                "then saved with the run"})
    scorer: str = field(default="letters", metadata={
        "choices": ("letters", "lines"),
        "help": "how a candidate list is scored: letters = the logits of the 20 answer letters at "
                "the prompt's end (the paper's verbalizer); lines = a learned vector on the hidden "
                "state at the end of each candidate's own line (ulmrec.line_head), trained with "
                "the same listwise loss"})
    max_len: int = field(default=1536, metadata={"help": "token budget of a prompt + response"})

    def data_config(self) -> DataConfig:
        return DataConfig(dataset=self.dataset)


def pid_index_notes(dataset_name: str, run: str = "index") -> list[str]:
    """The run note of a P-ID index built with the authors' preference text (--use-preference):
    that text was written from all of a user's reviews, so the index can carry held-out items."""
    path = runs_root() / dataset_name / run / "summary.json"
    if path.exists() and json.loads(path.read_text()).get("leak_prone"):
        return [f"user index: runs/{dataset_name}/{run} was built with the authors' preference text, "
                "written from ALL of a user's reviews (leak-prone: it may carry validation/test items)"]
    return []


def load_pid_table(dataset_name: str, run: str = "index") -> pd.DataFrame:
    """The user index table of a train.index run (runs/<dataset>/<run>/)."""
    path = runs_root() / dataset_name / run / "user_index.parquet"
    if not path.exists():
        out = "" if run == "index" else f" --out {run}"
        raise FileNotFoundError(f"{path} not found: run `python -m train.index --dataset {dataset_name}{out}`")
    return pd.read_parquet(path).rename(columns={"index": "tokens"})


def load_preference_series(ds, source: str) -> tuple[pd.Series | None, list[str]]:
    """user → preference text from the preferences stage (or the authors' release text)."""
    if source == "none":
        return None, ["no preferences: preference tasks skipped"]
    coverage = release_coverage(ds)
    if source == "release" or (source == "auto" and coverage >= 0.95):
        # users without the authors' text simply get no preference task
        return release_preferences(ds), [
            f"preferences: the authors' GPT-3.5 text for {coverage:.1%} of users, extracted from "
            "ALL of a user's reviews (leak-prone: it may mention validation/test items)"]
    return load_preferences(ds, backend=source), [f"preferences: '{source}' preferences stage output"]


def load_task_inputs(ds, cfg) -> tuple[TaskInputs, list[str]]:
    notes = []
    pid = load_pid_table(ds.name, cfg.index_run) if cfg.index_kind == "pid" else None
    index = user_index_strings(ds, cfg.index_kind, pid)
    prefs, pref_notes = load_preference_series(ds, cfg.preference_source)
    notes += pref_notes
    if cfg.index_kind == "release":           # built from all reviews: may carry held-out data
        notes.append(RELEASE_INDEX_NOTE)
    elif cfg.index_kind == "pid":             # built with the preference text: may too
        notes += pid_index_notes(ds.name, cfg.index_run)
    inp = task_inputs(ds, index, prefs, cfg.max_title_words, getattr(cfg, "item_tokens", False))
    mode = getattr(cfg, "train_candidates", "random")
    if mode in ("retriever", "retriever-only", "validation"):
        if cfg.retriever == "random":
            raise ValueError(f"train_candidates '{cfg.train_candidates}' needs a retriever run, "
                             "not retriever 'random'")
        split = "val" if mode == "validation" else "train"
        frame = load_candidates(ds, cfg, split)
        if frame.empty:
            raise ValueError(f"{ds.name}: the '{cfg.retriever}' candidates have no {split} rows (made "
                             f"before they were exported); rerun `python -m train.retrieve --dataset "
                             f"{ds.name} --model {cfg.retriever}` to re-export them")
        inp.retrieved = frame.set_index("user")["candidates"]
        if "scores" in frame:
            inp.retrieved_scores = frame.set_index("user")["scores"]
        held = frame["target_in_candidates"].mean()
        if mode == "validation":
            inp.retrieved_target = frame.set_index("user")["target"]
            notes.append(f"next-item training prompts: the retriever's held-out validation lists "
                         f"that hold their target ({held:.1%} of users), less the validation sample")
        else:
            notes.append(f"next-item training candidates: the retriever's top-{cfg.num_candidates} for "
                         f"the last training item where it holds the target ({held:.1%} of users), "
                         "random elsewhere")
    if inp.ratings is None and "rating" in cfg.tasks:
        notes.append("rating task skipped: this dataset has no ratings")
    return inp, notes


def load_candidates(ds, cfg, split: str) -> pd.DataFrame:
    """The retriever's top-20 per user for `split` (user, split, target, candidates, scores)."""
    if cfg.retriever == "random":
        return random_candidates(ds, split, cfg.num_candidates, seed=cfg.seed)
    path = runs_root() / ds.name / "retrieval" / cfg.retriever / "candidates.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m train.retrieve --dataset "
                                f"{ds.name} --model {cfg.retriever}`")
    frame = pd.read_parquet(path)
    return frame[frame["split"] == split].reset_index(drop=True)


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # the same random base every time, so a saved adapter reloads onto it
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def cuda_dtype() -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older ones (a T4 has no bf16)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base(cfg: RankerConfig, for_training: bool = True):
    """(model, tokenizer): the backbone, 4-bit on CUDA when asked, fp32 on CPU. A 4-bit base
    is prepared for k-bit training (gradient checkpointing, fp32 norms) only `for_training`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    source = resolve_backbone(cfg.backbone)
    offline = is_offline()  # HF_HUB_OFFLINE as huggingface_hub reads it: unset = online
    tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if cfg.tiny_backbone:
        return _tiny_llama(tok), tok
    kwargs = {"local_files_only": offline}
    if cfg.load_in_4bit and torch.cuda.is_available():
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=cuda_dtype())
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        if cfg.load_in_4bit:
            log.warning("load_in_4bit needs CUDA; loading the backbone in full precision on CPU")
        kwargs["dtype"] = cuda_dtype() if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if getattr(model, "is_loaded_in_4bit", False):  # already on its GPU (device_map)
        if for_training:
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif torch.cuda.is_available():
        model.to("cuda")
    return model, tok


def build_ranker(cfg: RankerConfig, ds=None, inputs=None, item_tokens_from: Path | None = None):
    """A fresh trainable ranker: backbone + index tokens + LoRA (`inputs`, the TaskInputs,
    give index_init='words' its users' codes and preference texts) + soft item tokens from
    the retriever run `item_tokens_from`, when given."""
    model, tok = load_base(cfg)
    new_ids = add_index_tokens(model, tok, index_vocabulary()) if cfg.index_tokens else None
    if new_ids and cfg.index_init == "words":
        if inputs is None or inputs.index is None or inputs.preference is None:
            raise ValueError("index_init 'words' needs a user index and preference texts")
        users = inputs.index.index.intersection(inputs.train.index)
        n = init_index_rows(model, tok, code_words(inputs.index[users], inputs.preference))
        log.info("index tokens: %d of %d rows start at their users' distinctive words", n, len(new_ids))
    model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, new_ids)
    if item_tokens_from is not None:
        hidden = model.get_input_embeddings().weight.shape[1]
        ItemTokens.from_retriever(item_tokens_from, hidden, len(tok)).attach(model, tok)
        log.info("soft item tokens: %d items from %s", model.item_tokens.num_items, item_tokens_from)
    if cfg.scorer == "lines":
        head = LineHead.fresh(model.get_input_embeddings().weight.shape[1]).attach(model)
        log.info("line scorer: a %d-weight vector on each candidate line's last hidden state "
                 "(trainable beside the LoRA)", head.weight.numel())
    return model, tok


def quantize_int8(model, skip: tuple[str, ...] = ()):
    """CPU serving, in place: the LoRA folded into the base weights, then the linear layers
    of the decoder stack stored in int8 (torchao's weight-only int8, one scale per output
    row; activations stay fp32), except those whose name ends with one of `skip`. The
    output head stays fp32, so the 20 letter logits keep full precision.

    Why weight-only and not torchao's dynamic int8 (int8 activations too): on a CPU without
    torch.compile that one ran at 0.03x fp32 on SmolLM2's MLP shapes (bench/int8_kernels.py,
    docs/app.md); the fbgemm kernels that made dynamic int8 fast live in
    torch.ao.quantization, deprecated. Weight-only int8 keeps fp32 speed, takes a quarter
    of the linear weights' memory and, with fp32 activations, has no outlier problem (so no
    layer needs skipping). Inference only: a merged model no longer trains."""
    # torchao is imported here: only --int8 serving needs it, and it is heavy to import
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if next(model.parameters()).is_cuda:
        raise ValueError("int8 weight-only quantization is a CPU serving option")
    if hasattr(model, "merge_adapter") and not any(getattr(m, "merged", False) for m in model.modules()):
        model.merge_adapter()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def wanted(module, name: str) -> bool:
        # a PeftModel's linear layers sit at <name>.base_layer beside unused lora_A / lora_B;
        # a layer already quantized has a torchao tensor subclass as weight, not a Parameter
        return (isinstance(module, torch.nn.Linear) and "lora_" not in name
                and type(module.weight) is torch.nn.Parameter
                and not name.removesuffix(".base_layer").endswith(tuple(skip)))
    quantize_(base.model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=wanted)
    return model.eval()


def load_ranker(adapter_dir: Path, cfg: RankerConfig, tokenizer_dir: Path | None = None):
    """A trained ranker from an adapter folder written by train.finetune (eval mode); the
    tokenizer from the same folder unless `tokenizer_dir` names another: its own files, or
    the base tokenizer + the added tokens its tokenizer_ref.json records."""
    from peft import PeftModel


    model, base_tok = load_base(cfg, for_training=False)
    tok = load_tokenizer(tokenizer_dir or adapter_dir, base_tok=base_tok)
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    model = PeftModel.from_pretrained(model, adapter_dir)
    item_tokens = ItemTokens.load(adapter_dir)
    if item_tokens is not None:
        item_tokens.attach(model, tok)
    head = LineHead.load(adapter_dir)
    if head is not None:
        head.attach(model)
    return model.eval(), tok


def serve_ready(model, tok, bf16: bool = False, int8: bool = False):
    """(model, tok) made ready to serve, once per model (callers hold a lock): on CPU the
    LoRA update merged into the weights and, if asked, bfloat16 or int8 linear layers (int8:
    the ranker; a bundle's decode/ adapter stays fp32); a CUDA model as loaded."""
    # marked on the model, not on `data`: several AppData may share one bundle's model
    if not getattr(model, "_ulmrec_app_ready", False):
        if next(model.parameters()).device.type == "cpu":
            if hasattr(model, "merge_adapter"):
                model.merge_adapter()
            if bf16:
                model.to(torch.bfloat16)
            elif int8:
                quantize_int8(model)
        model._ulmrec_app_ready = True
    return model, tok
