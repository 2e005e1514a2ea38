"""P2Rec (practice-friendly LLM-enhanced paradigm with preference parsing): pre-grouping,
user-level SFT, item knowledge augmentation, and gated fusion into new retrievers."""
from .augment import agreement, enhance_items
from .fusion import VARIANTS, GatedItemTable, GroupItemTable, build_variant, train_variant
from .grouping import frequency_vectors, item_embeddings, kmeans_groups, user_targets
from .llm import P2RecLM, add_lora, instruction, sft_loss
from .sft import instance_examples, mean_loss, time_steps, train_sft

__all__ = ["VARIANTS", "GatedItemTable", "GroupItemTable", "P2RecLM", "add_lora", "agreement",
           "build_variant", "enhance_items", "frequency_vectors", "instance_examples",
           "instruction", "item_embeddings", "kmeans_groups", "mean_loss", "sft_loss",
           "time_steps", "train_sft", "train_variant", "user_targets"]
