"""A procedurally generated image-text world (no downloads, deterministic).

Each image shows one shape on a textured background; its attributes are

* ``shape``  in square, circle, triangle, cross, ring, bar
* ``colour`` in red, green, blue, yellow, purple, orange, white, cyan
* ``size``   in small, large
* ``pos``    in left, right, top, bottom, centre

and its caption composes them ("a large red circle at the top"), with a few
paraphrase templates. Everything is a pure function of ``(seed, index)``:
the same numbers on every machine and every run.

What the tasks need:

* :func:`pairs` - image-text pairs with stable indices; ``holdout`` removes
  (shape, colour) combinations from training for compositional tests;
  ``dup_frac`` makes a fraction of samples near-duplicates (same attributes,
  other noise) of earlier ones: "false negatives" for contrastive losses.
* :func:`labelled` - classification over (shape, colour) classes with a
  long-tailed (Zipf) training distribution: head / torso / tail labels.
Datasets return CLIP-normalised images (:func:`normalize`); :func:`render` gives [0, 1] RGB.

* :func:`cir_triplets` - composed retrieval: reference image, modification
  text ("make it blue", "make it bigger", "move it to the left") and the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SHAPES = ("square", "circle", "triangle", "cross", "ring", "bar")
COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "white": (0.97, 0.97, 0.97), "cyan": (0.1, 0.85, 0.9),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "centre": (0.5, 0.5)}
POS_NAMES = tuple(POSITIONS)
POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
              "centre": "in the centre"}
TEMPLATES = ("a {size} {colour} {shape} {pos}.", "a photo of a {size} {colour} {shape} {pos}.",
             "{pos_cap}, a {size} {colour} {shape}.", "there is a {colour} {shape}, {size}, {pos}.")


# CLIP's (OpenAI) image normalisation, as open_clip's preprocessing applies it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> CLIP-normalised input (what the models expect)."""
    mean = torch.tensor(CLIP_MEAN, dtype=img.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=img.dtype).view(3, 1, 1)
    return (img - mean) / std


@dataclass(frozen=True)
class Attrs:
    shape: str
    colour: str
    size: str
    pos: str

    def caption(self, template: int = 0) -> str:
        t = TEMPLATES[template % len(TEMPLATES)]
        p = POS_PHRASE[self.pos]
        return t.format(size=self.size, colour=self.colour, shape=self.shape, pos=p, pos_cap=p[0].upper() + p[1:])


def _gen(seed: int, index: int, stream: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + index * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def render(a: Attrs, size: int = 32, seed: int = 0, index: int = 0) -> torch.Tensor:
    """float32 [3, size, size] in [0, 1]."""
    g = _gen(seed, index, 1)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    cx, cy = POSITIONS[a.pos]
    jitter = (torch.rand(2, generator=g) - 0.5) * 0.08
    cx, cy = cx + jitter[0].item(), cy + jitter[1].item()
    r = (0.2 if a.size == "large" else 0.11) * (1 + (torch.rand(1, generator=g).item() - 0.5) * 0.15)
    dx, dy = xs - cx, ys - cy
    if a.shape == "square":
        mask = (dx.abs() < r) & (dy.abs() < r)
    elif a.shape == "circle":
        mask = dx**2 + dy**2 < r**2
    elif a.shape == "triangle":
        mask = (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2)
    elif a.shape == "cross":
        w = r / 3
        mask = ((dx.abs() < w) & (dy.abs() < r)) | ((dy.abs() < w) & (dx.abs() < r))
    elif a.shape == "ring":
        d2 = dx**2 + dy**2
        mask = (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    elif a.shape == "bar":
        mask = (dx.abs() < r) & (dy.abs() < r / 3)
    else:
        raise ValueError(f"unknown shape {a.shape!r}")
    bg_level = 0.15 + 0.2 * torch.rand(3, 1, 1, generator=g)
    img = bg_level + 0.06 * torch.randn(3, size, size, generator=g)
    col = torch.tensor(COLOURS[a.colour]).view(3, 1, 1)
    col = (col + 0.05 * torch.randn(3, 1, 1, generator=g)).clamp(0, 1)
    img = torch.where(mask.unsqueeze(0), col.expand(3, size, size), img)
    return img.clamp(0, 1)


def random_attrs(g: torch.Generator, shapes=SHAPES, colours=COLOUR_NAMES) -> Attrs:
    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    return Attrs(pick(shapes), pick(colours), pick(SIZES), pick(POS_NAMES))


class PairsDataset(torch.utils.data.Dataset):
    """Image-text pairs ``(image, caption, index)`` with stable indices."""

    def __init__(self, attrs: List[Attrs], templates: List[int], seed: int, image_size: int,
                 tokenizer=None, render_seeds: Optional[List[int]] = None):
        self.attrs, self.templates = attrs, templates
        self.seed, self.image_size, self.tokenizer = seed, image_size, tokenizer
        self.render_seeds = render_seeds or list(range(len(attrs)))

    def __len__(self):
        return len(self.attrs)

    def caption(self, i: int) -> str:
        return self.attrs[i].caption(self.templates[i])

    def __getitem__(self, i):
        img = normalize(render(self.attrs[i], self.image_size, self.seed, self.render_seeds[i]))
        cap = self.caption(i)
        return img, (self.tokenizer([cap])[0] if self.tokenizer is not None else cap), i


def pairs(n: int, seed: int = 0, image_size: int = 32, holdout: Sequence[Tuple[str, str]] = (),
          only: Optional[Sequence[Tuple[str, str]]] = None, dup_frac: float = 0.0, tokenizer=None,
          shapes=SHAPES, colours=COLOUR_NAMES) -> PairsDataset:
    """``n`` pairs; (shape, colour) in ``holdout`` never appear; with ``only``,
    only those combinations appear. A ``dup_frac`` fraction repeats the
    attributes of an earlier sample (a near-duplicate: a false negative)."""
    g = _gen(seed, 0, 2)
    held = set(holdout)
    allowed = set(only) if only is not None else None
    attrs: List[Attrs] = []
    templates: List[int] = []
    while len(attrs) < n:
        if attrs and dup_frac > 0 and torch.rand(1, generator=g).item() < dup_frac:
            a = attrs[int(torch.randint(len(attrs), (1,), generator=g))]
        else:
            a = random_attrs(g, shapes, colours)
            if (a.shape, a.colour) in held or (allowed is not None and (a.shape, a.colour) not in allowed):
                continue
        attrs.append(a)
        templates.append(int(torch.randint(len(TEMPLATES), (1,), generator=g)))
    return PairsDataset(attrs, templates, seed, image_size, tokenizer)


class LabelledDataset(torch.utils.data.Dataset):
    def __init__(self, attrs: List[Attrs], labels: List[int], classes: List[Tuple[str, str]], seed: int,
                 image_size: int, offset: int):
        self.attrs, self.labels, self.classes = attrs, labels, classes
        self.seed, self.image_size, self.offset = seed, image_size, offset

    def __len__(self):
        return len(self.attrs)

    def prompts(self, template: str = "a photo of a {colour} {shape}.") -> List[str]:
        return [template.format(colour=c, shape=s) for s, c in self.classes]

    def __getitem__(self, i):
        return normalize(render(self.attrs[i], self.image_size, self.seed, self.offset + i)), self.labels[i], i


def labelled(n_train: int, n_val: int, seed: int = 0, image_size: int = 32, num_classes: int = 24,
             zipf: float = 1.2) -> Tuple[LabelledDataset, LabelledDataset]:
    """(train, val): classes are (shape, colour) pairs; train counts follow a
    Zipf law (class k gets weight 1/(k+1)^zipf: a long tail); val is balanced."""
    g = _gen(seed, 0, 3)
    combos = [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    perm = torch.randperm(len(combos), generator=g).tolist()
    classes = [combos[i] for i in perm[:num_classes]]
    w = torch.tensor([1.0 / (k + 1) ** zipf for k in range(num_classes)])
    train_labels = torch.multinomial(w, n_train, replacement=True, generator=g).tolist()
    # every class appears at least once in training
    for k in range(num_classes):
        if k not in train_labels:
            train_labels[k % max(n_train, 1)] = k
    val_labels = [k % num_classes for k in range(n_val)]

    def make(labels, offset):
        attrs = []
        for y in labels:
            s, c = classes[y]
            attrs.append(Attrs(s, c, SIZES[int(torch.randint(2, (1,), generator=g))],
                               POS_NAMES[int(torch.randint(len(POS_NAMES), (1,), generator=g))]))
        return LabelledDataset(attrs, list(labels), classes, seed, image_size, offset)

    return make(train_labels, 0), make(val_labels, 1_000_000)


class CIRDataset(torch.utils.data.Dataset):
    """Triplets over a gallery of rendered images: ``(ref, text, target, ref_index, target_index)``."""

    def __init__(self, gallery: List[Attrs], triplets: List[Tuple[int, str, int]], seed: int, image_size: int):
        self.gallery, self.triplets, self.seed, self.image_size = gallery, triplets, seed, image_size

    def __len__(self):
        return len(self.triplets)

    def image(self, gi: int) -> torch.Tensor:
        return normalize(render(self.gallery[gi], self.image_size, self.seed, 2_000_000 + gi))

    def __getitem__(self, i):
        r, text, t = self.triplets[i]
        return self.image(r), text, self.image(t), r, t

    def gallery_indices(self, i: int) -> Tuple[int, int]:
        """(reference, target) gallery indices of triplet ``i``, without rendering them."""
        r, _, t = self.triplets[i]
        return r, t


def _modify(a: Attrs, g: torch.Generator) -> Tuple[Attrs, str]:
    kind = int(torch.randint(3, (1,), generator=g))
    if kind == 0:
        c = a.colour
        while c == a.colour:
            c = COLOUR_NAMES[int(torch.randint(len(COLOUR_NAMES), (1,), generator=g))]
        return Attrs(a.shape, c, a.size, a.pos), f"make it {c}"
    if kind == 1:
        s = "large" if a.size == "small" else "small"
        return Attrs(a.shape, a.colour, s, a.pos), ("make it bigger" if s == "large" else "make it smaller")
    p = a.pos
    while p == a.pos:
        p = POS_NAMES[int(torch.randint(len(POS_NAMES), (1,), generator=g))]
    return Attrs(a.shape, a.colour, a.size, p), f"move it {POS_PHRASE[p]}"


def cir_triplets(n: int, seed: int = 0, image_size: int = 32, gallery_size: Optional[int] = None) -> CIRDataset:
    """``n`` triplets over one gallery; every reference and target is a gallery image."""
    g = _gen(seed, 0, 4)
    gallery: List[Attrs] = []
    index: Dict[Attrs, int] = {}

    def add(a: Attrs) -> int:
        if a not in index:
            index[a] = len(gallery)
            gallery.append(a)
        return index[a]

    triplets = []
    for _ in range(n):
        a = random_attrs(g)
        b, text = _modify(a, g)
        triplets.append((add(a), text, add(b)))
    while gallery_size is not None and len(gallery) < gallery_size:
        add(random_attrs(g))
    return CIRDataset(gallery, triplets, seed, image_size)


# ---------------------------------------------------------------------------------------------
# The APFT protocol's world (issue 18): a shifted rendering style and a long-tailed labelled set
# ---------------------------------------------------------------------------------------------

# "archival": a faded sepia print, the fine-tuning domain of the APFT protocol (the paper's domain is
# archival photographs). Applied per pixel to :func:`render`'s image: colours pulled ``desat`` of the way
# to their grey level, the black level lifted to ``lift`` and the contrast cut to ``gain``, a sepia cast
# (``tint``, per channel) and film grain (``grain``, sd per pixel). :func:`render` itself is unchanged
# (the base model's cache key hashes its source), so "plain" is exactly the pretraining domain.
STYLES: Dict[str, Dict] = {
    "plain": {},
    "archival": dict(desat=0.6, lift=0.35, gain=0.5, tint=(1.0, 0.82, 0.58), grain=0.05),
}


def render_styled(a: Attrs, size: int = 32, seed: int = 0, index: int = 0, style: str = "plain") -> torch.Tensor:
    """:func:`render` in a visual ``style`` of :data:`STYLES` (float32 [3, size, size] in [0, 1]); "plain"
    is :func:`render` itself, bit for bit."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {tuple(STYLES)}")
    img = render(a, size, seed, index)
    st = STYLES[style]
    if not st:
        return img
    grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)
    img = (1 - st["desat"]) * img + st["desat"] * grey
    img = st["lift"] + st["gain"] * img
    img = img * torch.tensor(st["tint"], dtype=img.dtype).view(3, 1, 1)
    g = _gen(seed, index, 5)
    img = img + st["grain"] * torch.randn(1, size, size, generator=g)  # monochrome grain, like film
    return img.clamp(0, 1)


def longtail_counts(num_classes: int, head_count: int, zipf: float = 1.2, min_count: int = 1) -> List[int]:
    """Training images per class, class ``k`` (0 = the head) getting ``round(head_count / (k + 1) ** zipf)``,
    at least ``min_count``: a deterministic Zipf long tail (non-increasing in ``k``)."""
    if num_classes < 1 or head_count < 1 or min_count < 1:
        raise ValueError(f"num_classes, head_count and min_count must be >= 1, got {num_classes}, {head_count}, "
                         f"{min_count}")
    return [max(min_count, int(round(head_count / (k + 1) ** zipf))) for k in range(num_classes)]


class StyledLabelled(torch.utils.data.Dataset):
    """Pre-rendered labelled images ``(image, label, index)`` in one style; ``classes[label]`` is a
    (shape, colour) pair and ``labels`` is a plain list (as :func:`labelled`'s datasets)."""

    def __init__(self, attrs: List[Attrs], labels: List[int], classes: List[Tuple[str, str]], seed: int,
                 image_size: int, offset: int, style: str):
        self.attrs, self.labels, self.classes, self.style = attrs, list(labels), list(classes), style
        self.images = (torch.stack([normalize(render_styled(a, image_size, seed, offset + i, style))
                                    for i, a in enumerate(attrs)])
                       if attrs else torch.zeros(0, 3, image_size, image_size))

    def __len__(self):
        return len(self.attrs)

    def prompts(self, template: str = "a photo of a {colour} {shape}.") -> List[str]:
        return [template.format(colour=c, shape=s) for s, c in self.classes]

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i


def styled_labelled(classes: Sequence[Tuple[str, str]], counts: Sequence[int], seed: int, image_size: int = 16,
                    style: str = "plain", offset: int = 0) -> StyledLabelled:
    """``counts[k]`` images of class ``classes[k]`` each (size and position drawn at random), rendered in
    ``style``; a pure function of its arguments."""
    if len(classes) != len(counts):
        raise ValueError(f"{len(classes)} classes but {len(counts)} counts")
    g = _gen(seed, offset, 6)
    attrs, labels = [], []
    for k, ((s, c), n) in enumerate(zip(classes, counts)):
        for _ in range(int(n)):
            attrs.append(Attrs(s, c, SIZES[int(torch.randint(2, (1,), generator=g))],
                               POS_NAMES[int(torch.randint(len(POS_NAMES), (1,), generator=g))]))
            labels.append(k)
    return StyledLabelled(attrs, labels, list(classes), seed, image_size, offset, style)


def shifted_longtail(seed: int = 0, num_classes: int = 30, head_count: int = 64, zipf: float = 1.2,
                     min_count: int = 1, val_per_class: int = 4, test_per_class: int = 8, image_size: int = 16,
                     style: str = "archival") -> Dict[str, StyledLabelled]:
    """The APFT protocol's fine-tuning domain: ``num_classes`` (shape, colour) classes drawn per seed, in
    ``style``; ``train`` long-tailed (:func:`longtail_counts`: class 0 is the head), ``val`` and ``test``
    balanced, every split with its own renders."""
    combos = [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    if not 1 <= num_classes <= len(combos):
        raise ValueError(f"num_classes must be in [1, {len(combos)}], got {num_classes}")
    perm = torch.randperm(len(combos), generator=_gen(seed, 0, 7)).tolist()
    classes = [combos[i] for i in perm[:num_classes]]
    return {"train": styled_labelled(classes, longtail_counts(num_classes, head_count, zipf, min_count), seed,
                                     image_size, style, 0),
            "val": styled_labelled(classes, [val_per_class] * num_classes, seed, image_size, style, 1_000_000),
            "test": styled_labelled(classes, [test_per_class] * num_classes, seed, image_size, style, 2_000_000)}
