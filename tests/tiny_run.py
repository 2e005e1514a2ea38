"""A real but tiny ranker run for tests that need a trained adapter: extractive preferences,
2 fine-tuning steps of a seeded random Llama, and its evaluation (under $ULMREC_RUNS)."""
from train import evaluate, finetune
from ulmrec.data import load_dataset
from ulmrec.preferences.run import PreferenceConfig, extract, make_backend


def train_and_evaluate(args: list[str], results_dir, run: str = "t") -> None:
    ds = load_dataset("gift-cards")
    pcfg = PreferenceConfig(dataset="gift-cards", backend="extractive")
    extract(ds, make_backend(pcfg, ds), pcfg)
    assert finetune.main(args + ["--run-name", run, "--max-steps", "2", "--eval-every", "2",
                                 "--batch-size", "2", "--eval-users", "4", "--lora-dropout", "0",
                                 "--learning-rate", "0.01", "--warmup-steps", "0"]) == 0
    assert evaluate.main(args + ["--runs", run, "--baselines", "retriever", "--max-users", "12",
                                 "--fusion-val-users", "6", "--results-dir", str(results_dir)]) == 0


def train_tiny_retriever() -> None:
    """A 2-epoch LRURec of width 16 on gift-cards (under $ULMREC_RUNS): real lists, seconds."""
    from ulmrec.retrieval.trainer import RetrievalConfig, run
    run(RetrievalConfig(dataset="gift-cards", model="lrurec", hidden=16, max_epochs=2,
                        batch_size=64, max_len=20))


# a residual ranker over the tiny retriever: gift-cards, a seeded random Llama, short prompts
RESIDUAL_DATA = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "lrurec",
                 "--index-kind", "oid", "--preference-source", "none", "--max-history", "3",
                 "--max-title-words", "4", "--max-len", "256"]
