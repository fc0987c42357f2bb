"""Evaluation: retrieval (Recall/mAP/mP@K, per head/torso/tail), caption R@K, zero-shot, CIR Recall@K."""

from .metrics import (  # noqa: F401
    caption_retrieval,
    cir_recall,
    frequency_groups,
    grouped_label_retrieval,
    label_relevance,
    ranked_relevance,
    retrieval_metrics,
    zero_shot_accuracy,
)
