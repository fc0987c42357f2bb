"""Retrieval / classification metrics against rankings worked by hand."""

import math

import pytest
import torch

from vlmkern.app.eval import (caption_retrieval, cir_recall, frequency_groups, grouped_label_retrieval,
                          retrieval_metrics, zero_shot_accuracy)


def test_retrieval_metrics_hand_worked():
    # one query, gallery of 5; scores rank items 2,0,4,1,3; relevant: {0, 3}
    sim = torch.tensor([[0.8, 0.2, 0.9, 0.1, 0.5]])
    rel = torch.tensor([[True, False, False, True, False]])
    m = retrieval_metrics(sim, rel, ks=[1, 2, 3, 5])
    # ranked relevance: 0,1,0,0,1
    assert m["hit"] == {1: 0.0, 2: 1.0, 3: 1.0, 5: 1.0}
    assert m["mP"][1] == 0.0 and m["mP"][2] == 0.5 and math.isclose(m["mP"][3], 1 / 3) and m["mP"][5] == 0.4
    assert m["recall"][2] == 0.5 and m["recall"][5] == 1.0
    # AP@5 = (P@2 * 1 + P@5 * 1) / min(5, 2) = (0.5 + 0.4) / 2
    assert math.isclose(m["mAP"][5], 0.45)
    # AP@1 = 0, AP@2 = 0.5 / min(2,2) = 0.25, AP@3 = 0.5 / 2
    assert m["mAP"][1] == 0.0 and math.isclose(m["mAP"][2], 0.25) and math.isclose(m["mAP"][3], 0.25)


def test_ties_broken_by_gallery_index_and_queries_without_relevant_skipped():
    sim = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    rel = torch.tensor([[False, True, False], [False, False, False]])
    m = retrieval_metrics(sim, rel, ks=[1, 2])
    assert m["hit"] == {1: 0.0, 2: 1.0}  # item 0 ranks first on a tie; query 2 has no relevant item
    mask = torch.tensor([False, True])
    assert math.isnan(retrieval_metrics(sim, rel, ks=[1], query_mask=mask)["hit"][1])


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="relevant"):
        retrieval_metrics(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan")]]), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="target_index"):
        cir_recall(torch.eye(2), torch.eye(2), torch.tensor([0, 5]))


def test_frequency_groups():
    labels = [0] * 10 + [1] * 5 + [2] * 5 + [3] * 2 + [4] * 1
    g = frequency_groups(labels, num_classes=6, head_frac=0.2, tail_frac=0.4)
    # counts: 10, 5, 5, 2, 1, 0 -> order 0,1,2,3,4,5; head 1 class, tail 2 classes (round(2.4))
    assert g == {"head": [0], "torso": [1, 2, 3], "tail": [4, 5]}


def test_grouped_label_retrieval_and_zero_shot():
    # 3 classes on the axes; images near their class except image 3 (label 2) near class 0
    text = torch.eye(3)
    imgs = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0], [0.9, 0.0, 0.3]])
    labels = torch.tensor([0, 1, 2, 2])
    acc = zero_shot_accuracy(imgs, labels, text, topk=(1, 2))
    assert acc[1] == 0.75 and acc[2] == 1.0
    res = grouped_label_retrieval(imgs, labels, text, groups={"head": [2], "tail": [0, 1]}, ks=[1, 2])
    assert res["i2t"]["all"]["hit"][1] == 0.75
    assert res["i2t"]["head"]["hit"][1] == 0.5  # images 2, 3
    assert res["i2t"]["tail"]["hit"][1] == 1.0
    # T2I: class 2's ranking of images: img2 (1.0), img3 (0.3), img1 (0.2) -> P@2 = 1
    assert res["t2i"]["head"]["mP"][2] == 1.0
    # class 0: img0 (1.0), img3 (0.9): P@2 = 0.5, AP@2 = 1/1
    assert res["t2i"]["tail"]["mAP"][2] == 1.0


def test_caption_retrieval_two_captions_per_image():
    imgs = torch.eye(2)
    caps = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0], [0.9, 0.1]])
    owner = torch.tensor([0, 0, 1, 1])  # caption 3 belongs to image 1 but looks like image 0
    r = caption_retrieval(imgs, caps, owner, ks=(1, 2))
    assert r["i2t"] == {1: 1.0, 2: 1.0}
    assert r["t2i"] == {1: 0.5, 2: 1.0}  # captions 1 and 3 miss at K=1


def test_cir_recall_exclusion_and_subset():
    gallery = torch.eye(4)
    q = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0]])
    target = torch.tensor([1, 2])
    ref = torch.tensor([0, 3])
    assert cir_recall(q, gallery, target, ks=(1, 2)) == {1: 0.0, 2: 1.0}
    assert cir_recall(q, gallery, target, ks=(1,), exclude_index=ref) == {1: 1.0}
    subset = torch.tensor([[1, 2], [2, 0]])
    assert cir_recall(q, gallery, target, ks=(1,), subset=subset) == {1: 1.0}
