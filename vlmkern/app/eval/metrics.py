"""Retrieval and classification metrics, computed from a similarity matrix.

Conventions (every function works on a score matrix ``sim`` [num_queries,
num_gallery], higher = more similar, and a boolean relevance matrix of the same
shape; ties are broken by gallery index, i.e. ``torch.sort(stable=True)`` on
the negated scores, so results are deterministic):

* ``precision@K``   = |relevant in top K| / K
* ``recall@K``      = |relevant in top K| / |relevant|    (queries with no relevant item are skipped)
* ``hit@K``         = 1 if any relevant item is in the top K (the "R@K" of
  Flickr/COCO caption retrieval and of composed image retrieval)
* ``AP@K``          = sum_{i<=K} P@i * rel_i / min(K, |relevant|)
* ``mP@K``, ``mAP@K``, ``Recall@K`` are their means over queries.

APFT reports I2T and T2I mAP@K, mP@K and Recall@K for K = 1..20, per
head / torso / tail label-frequency group (:func:`frequency_groups`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch

DEFAULT_KS = tuple(range(1, 21))


def _check(sim: torch.Tensor, relevant: torch.Tensor) -> None:
    if sim.dim() != 2:
        raise ValueError(f"sim must be 2-D [queries, gallery], got shape {tuple(sim.shape)}")
    if relevant.shape != sim.shape:
        raise ValueError(f"relevant must have the shape of sim {tuple(sim.shape)}, got {tuple(relevant.shape)}")
    if not torch.isfinite(sim).all():
        raise ValueError("sim contains NaN or inf")


def ranked_relevance(sim: torch.Tensor, relevant: torch.Tensor, max_k: Optional[int] = None) -> torch.Tensor:
    """Relevance of the gallery items in ranked order: bool [queries, max_k]."""
    _check(sim, relevant)
    order = torch.sort(-sim.float(), dim=1, stable=True).indices
    if max_k is not None:
        order = order[:, :max_k]
    return torch.gather(relevant.bool(), 1, order)


def retrieval_metrics(sim: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                      query_mask: Optional[torch.Tensor] = None) -> Dict[str, Dict[int, float]]:
    """``{"mAP": {K: v}, "mP": {K: v}, "recall": {K: v}, "hit": {K: v}}`` averaged over queries.

    ``query_mask`` (bool [queries]) restricts the average to a subset of the
    queries (e.g. one label-frequency group). Queries without any relevant
    item are left out of every average (they have no defined recall or AP).
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    max_k = min(ks[-1], sim.shape[1])
    rel_ranked = ranked_relevance(sim, relevant, max_k).double()  # [Q, max_k]
    n_rel = relevant.bool().sum(1).double()  # [Q]
    keep = n_rel > 0
    if query_mask is not None:
        if query_mask.shape != (sim.shape[0],):
            raise ValueError(f"query_mask must have shape ({sim.shape[0]},), got {tuple(query_mask.shape)}")
        keep = keep & query_mask.bool()
    out: Dict[str, Dict[int, float]] = {"mAP": {}, "mP": {}, "recall": {}, "hit": {}}
    if keep.sum() == 0:
        for k in ks:
            for m in out:
                out[m][k] = float("nan")
        return out
    rel_ranked = rel_ranked[keep]
    n_rel = n_rel[keep]
    cum = rel_ranked.cumsum(1)  # hits within top i
    ranks = torch.arange(1, max_k + 1, dtype=torch.float64)
    prec_at_i = cum / ranks  # P@i
    for k in ks:
        kk = min(k, max_k)
        hits = cum[:, kk - 1]
        out["mP"][k] = (hits / k).mean().item()
        out["recall"][k] = (hits / n_rel).mean().item()
        out["hit"][k] = (hits > 0).double().mean().item()
        ap = (prec_at_i[:, :kk] * rel_ranked[:, :kk]).sum(1) / torch.clamp(n_rel, max=k)
        out["mAP"][k] = ap.mean().item()
    return out


def label_relevance(query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """bool [Q, G]: gallery item relevant to a query when their labels match."""
    return query_labels.view(-1, 1) == gallery_labels.view(1, -1)


def frequency_groups(train_labels: Iterable[int], num_classes: Optional[int] = None,
                     head_frac: float = 0.2, tail_frac: float = 0.4) -> Dict[str, List[int]]:
    """Split classes into head / torso / tail by training frequency.

    Classes sorted by count (descending, ties by class id): the first
    ``head_frac`` of the classes are *head*, the last ``tail_frac`` are *tail*,
    the rest *torso*. Classes never seen in training count as 0 (tail).
    """
    labels = torch.as_tensor(list(train_labels), dtype=torch.long)
    n = int(num_classes if num_classes is not None else (int(labels.max()) + 1 if labels.numel() else 0))
    if not 0 <= head_frac <= 1 or not 0 <= tail_frac <= 1 or head_frac + tail_frac > 1:
        raise ValueError(f"head_frac and tail_frac must be in [0, 1] with sum <= 1, got {head_frac}, {tail_frac}")
    counts = torch.bincount(labels, minlength=n)[:n]
    order = sorted(range(n), key=lambda c: (-int(counts[c]), c))
    n_head = int(round(head_frac * n))
    n_tail = int(round(tail_frac * n))
    n_torso = n - n_head - n_tail
    return {
        "head": sorted(order[:n_head]),
        "torso": sorted(order[n_head:n_head + n_torso]),
        "tail": sorted(order[n_head + n_torso:]),
    }


def grouped_label_retrieval(image_feats: torch.Tensor, image_labels: torch.Tensor, class_text_feats: torch.Tensor,
                            groups: Optional[Mapping[str, Sequence[int]]] = None,
                            ks: Sequence[int] = DEFAULT_KS) -> Dict[str, Dict[str, Dict[str, Dict[int, float]]]]:
    """APFT's protocol: I2T (image -> class prompts) and T2I (class prompt -> images).

    Returns ``{direction: {group: metrics}}`` with group ``"all"`` plus each
    group of ``groups`` (class ids). For I2T a query belongs to the group of
    its label; for T2I a query *is* a class.
    """
    sim = image_feats.float() @ class_text_feats.float().T  # [N, C]
    C = class_text_feats.shape[0]
    classes = torch.arange(C)
    rel_i2t = label_relevance(image_labels, classes)
    rel_t2i = rel_i2t.T.contiguous()
    out: Dict[str, Dict[str, Dict[str, Dict[int, float]]]] = {"i2t": {}, "t2i": {}}
    out["i2t"]["all"] = retrieval_metrics(sim, rel_i2t, ks)
    out["t2i"]["all"] = retrieval_metrics(sim.T.contiguous(), rel_t2i, ks)
    for name, cls in (groups or {}).items():
        cls_t = torch.as_tensor(list(cls), dtype=torch.long)
        in_group = torch.zeros(C, dtype=torch.bool)
        in_group[cls_t] = True
        out["i2t"][name] = retrieval_metrics(sim, rel_i2t, ks, query_mask=in_group[image_labels])
        out["t2i"][name] = retrieval_metrics(sim.T.contiguous(), rel_t2i, ks, query_mask=in_group)
    return out


def caption_retrieval(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> Dict[str, Dict[int, float]]:
    """Flickr/COCO-style R@K with several captions per image.

    ``text_to_image[t]`` is the image index of caption ``t``. Image->text: a hit
    when any of the image's captions is in the top K; text->image: when its
    image is. Returns ``{"i2t": {K: R@K}, "t2i": {K: R@K}}`` (fractions).
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    sim = image_feats.float() @ text_feats.float().T  # [I, T]
    rel = torch.arange(image_feats.shape[0]).view(-1, 1) == t2i.view(1, -1)
    i2t = retrieval_metrics(sim, rel, ks)["hit"]
    t2i_m = retrieval_metrics(sim.T.contiguous(), rel.T.contiguous(), ks)["hit"]
    return {"i2t": i2t, "t2i": t2i_m}


def zero_shot_accuracy(image_feats: torch.Tensor, labels: torch.Tensor, class_text_feats: torch.Tensor,
                       topk: Sequence[int] = (1,)) -> Dict[int, float]:
    """Top-k zero-shot classification accuracy (class = most similar prompt)."""
    sim = image_feats.float() @ class_text_feats.float().T
    rel = label_relevance(labels, torch.arange(class_text_feats.shape[0]))
    return retrieval_metrics(sim, rel, topk)["hit"]


def cir_recall(query_feats: torch.Tensor, gallery_feats: torch.Tensor, target_index: torch.Tensor,
               ks: Sequence[int] = (1, 5, 10, 50), exclude_index: Optional[torch.Tensor] = None,
               subset: Optional[torch.Tensor] = None) -> Dict[int, float]:
    """Composed image retrieval Recall@K (hit rate of the target image).

    ``exclude_index[q]`` (the reference image, as CIRR's protocol requires) is
    removed from query q's ranking. ``subset`` (long [Q, S]) restricts each
    query's gallery to S candidate images (CIRR's Recall_subset@K; the subset
    should contain the target, and the reference is dropped from it as well).
    """
    sim = query_feats.float() @ gallery_feats.float().T  # [Q, G]
    Q, G = sim.shape
    target_index = torch.as_tensor(target_index, dtype=torch.long)
    if target_index.shape != (Q,):
        raise ValueError(f"target_index must have shape ({Q},), got {tuple(target_index.shape)}")
    if ((target_index < 0) | (target_index >= G)).any():
        raise ValueError(f"target_index must be in [0, {G})")
    neg_inf = torch.finfo(sim.dtype).min
    if exclude_index is not None:
        ex = torch.as_tensor(exclude_index, dtype=torch.long).view(-1, 1)
        sim = sim.scatter(1, ex, neg_inf)
    rel = torch.zeros(Q, G, dtype=torch.bool)
    rel[torch.arange(Q), target_index] = True
    if subset is not None:
        subset = torch.as_tensor(subset, dtype=torch.long)
        allowed = torch.zeros(Q, G, dtype=torch.bool)
        allowed.scatter_(1, subset, True)
        sim = torch.where(allowed, sim, torch.full_like(sim, neg_inf))
        if exclude_index is not None:
            sim = sim.scatter(1, torch.as_tensor(exclude_index, dtype=torch.long).view(-1, 1), neg_inf)
    # excluded / out-of-subset items sit at the bottom; rank only among the rest
    return retrieval_metrics(sim, rel, ks)["hit"]
