"""Datasets in the formats people already have, with stable per-sample indices.

* :class:`ImageTextCSV`  - image-text pairs from CSV/TSV (open_clip's training CSV:
  an image-path column and a caption column).
* :class:`WebDatasetTar` - image-text pairs from webdataset ``.tar`` shards
  (``key.jpg|png|webp`` + ``key.txt`` or ``key.json`` with a ``caption``).
* :class:`LabelledImages` - labelled images from a class-per-folder tree or a CSV
  with a label column; class names become text prompts.
* :class:`CIRTriplets`   - composed-retrieval triplets (reference image,
  modification text, target image) in the FashionIQ and CIRR JSON layouts.

Every pair/triplet dataset returns the sample's **stable dataset index** (its
row / member position in the source, fixed across epochs, shuffles and
workers): the key of TuneCLIP's per-sample ``u`` state.

Bad samples (missing file, unreadable image, empty caption) are found when
the dataset is built (``verify=True``, the default: each image's header is
opened), reported with their path, and either skipped (``on_error="skip"``:
``dataset.bad`` lists them and ``report()`` gives the count) or fatal
(``on_error="raise"``: a :class:`BadSampleError` naming the path) - never a
crash deep inside a DataLoader worker. An image that breaks later anyway
(changed on disk) raises :class:`BadSampleError` with its path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadSampleError(RuntimeError):
    """A sample could not be used; the message names its path and why."""


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise ImportError("vlmkern.app.data needs Pillow: pip install pillow") from exc
    return Image


def _check_image_file(path: str) -> Optional[str]:
    """None if the file is a readable image, else the reason."""
    if not os.path.isfile(path):
        return "missing file"
    try:
        Image = _pil()
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def _load_image(path_or_bytes, what: str):
    Image = _pil()
    try:
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
        with Image.open(src) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise BadSampleError(f"{what}: unreadable image ({type(exc).__name__}: {exc})") from exc


def default_transform(size: int = 224, normalize: bool = True) -> Callable:
    """Resize (shorter side), centre-crop, to a float tensor; CLIP-normalised unless
    ``normalize=False`` (then in [0, 1]). No torchvision needed; for a pretrained
    model's exact preprocessing pass open_clip's ``preprocess`` as ``transform``."""

    def tf(img):
        Image = _pil()
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
        t = t.permute(2, 0, 1).float() / 255.0
        if normalize:
            from .synthetic import normalize as clip_normalize

            t = clip_normalize(t)
        return t

    return tf


class _BadSamples:
    def __init__(self, on_error: str):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error = on_error
        self.bad: List[Tuple[str, str]] = []

    def add(self, where: str, why: str) -> None:
        if self.on_error == "raise":
            raise BadSampleError(f"{where}: {why}")
        self.bad.append((where, why))

    def report(self) -> str:
        if not self.bad:
            return "no bad samples"
        lines = [f"{len(self.bad)} bad sample(s) skipped:"] + [f"  {w}: {y}" for w, y in self.bad[:20]]
        if len(self.bad) > 20:
            lines.append(f"  ... and {len(self.bad) - 20} more")
        return "\n".join(lines)


class _ReportsBadSamples(Dataset):
    """``bad`` (list of (where, why)) and ``report()`` for the datasets below."""

    _bad: _BadSamples

    @property
    def bad(self) -> List[Tuple[str, str]]:
        return self._bad.bad

    def report(self) -> str:
        return self._bad.report()


@dataclass
class Pair:
    image: Any
    text: Any
    index: int


class ImageTextCSV(_ReportsBadSamples):
    """Image-text pairs from a CSV/TSV file.

    Args:
        path: the .csv / .tsv file (separator from the extension unless ``sep``).
        img_key, caption_key: column names (open_clip's defaults: ``filepath``, ``title``).
        root: folder that relative image paths are resolved against (default: the file's folder).
        transform: image -> tensor (default :func:`default_transform`).
        tokenizer: caption -> tokens (e.g. ``open_clip.get_tokenizer(...)``); raw string when None.
        on_error: ``"skip"`` or ``"raise"`` for bad rows; ``verify``: open each image header upfront.

    ``dataset[i]`` returns ``(image, text, index)``, ``index`` = the row's
    position in the file (data rows, from 0), stable whatever is skipped.
    """

    def __init__(self, path: str, img_key: str = "filepath", caption_key: str = "title", sep: Optional[str] = None,
                 root: Optional[str] = None, transform: Optional[Callable] = None,
                 tokenizer: Optional[Callable] = None, on_error: str = "skip", verify: bool = True):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ImageTextCSV: path {path!r} does not exist")
        self.sep = sep or ("\t" if path.endswith(".tsv") else ",")
        self.root = root if root is not None else os.path.dirname(os.path.abspath(path))
        self.transform = transform or default_transform()
        self.tokenizer = tokenizer
        self._bad = _BadSamples(on_error)
        self.rows: List[Tuple[str, str, int]] = []
        self._num_rows = 0
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=self.sep)
            fields = reader.fieldnames or []
            for key, what in ((img_key, "img_key"), (caption_key, "caption_key")):
                if key not in fields:
                    raise ValueError(f"ImageTextCSV: {what}={key!r} is not a column of {path} (columns: {fields})")
            for i, row in enumerate(reader):
                self._num_rows = i + 1
                img = os.path.join(self.root, row[img_key]) if not os.path.isabs(row[img_key]) else row[img_key]
                cap = (row[caption_key] or "").strip()
                where = f"{path}:{i + 2} ({img})"
                if not cap:
                    self._bad.add(where, "empty caption")
                    continue
                if verify:
                    why = _check_image_file(img)
                    if why:
                        self._bad.add(where, why)
                        continue
                self.rows.append((img, cap, i))

    @property
    def num_samples(self) -> int:
        """Size of the index space (rows in the file, bad ones included): size the ``u`` state with it."""
        return self._num_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img, cap, idx = self.rows[i]
        image = self.transform(_load_image(img, img))
        text = self.tokenizer([cap])[0] if self.tokenizer is not None else cap
        return image, text, idx


class WebDatasetTar(_ReportsBadSamples):
    """Image-text pairs from webdataset tar shards, as a map-style dataset.

    Samples are grouped by key (the member name without its extension); a
    sample needs one image member and a ``.txt`` caption (or a ``.json`` with
    a ``caption`` / ``text`` field). The stable index is the sample's position
    over the shards in the order given.
    """

    def __init__(self, shards: Sequence[str], transform: Optional[Callable] = None,
                 tokenizer: Optional[Callable] = None, on_error: str = "skip"):
        if isinstance(shards, str):
            shards = [shards]
        self.shards = list(shards)
        self.transform = transform or default_transform()
        self.tokenizer = tokenizer
        self._bad = _BadSamples(on_error)
        self.samples: List[Tuple[int, str, str, int]] = []  # shard id, image member, caption, index
        self._open: Dict[int, tarfile.TarFile] = {}
        index = 0
        for sid, shard in enumerate(self.shards):
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"WebDatasetTar: shard {shard!r} does not exist")
            groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
            order: List[str] = []
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    key, dot, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(m.name), key)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key]["." + ext.lower()] = m
                for key in order:
                    g = groups[key]
                    where = f"{shard}:{key}"
                    img = next((g[e] for e in IMAGE_EXTS if e in g), None)
                    cap = ""
                    if ".txt" in g:
                        cap = tar.extractfile(g[".txt"]).read().decode("utf-8", "replace").strip()
                    elif ".json" in g:
                        try:
                            meta = json.loads(tar.extractfile(g[".json"]).read())
                            cap = str(meta.get("caption") or meta.get("text") or "").strip()
                        except Exception as exc:
                            self._bad.add(where, f"bad json ({exc})")
                            index += 1
                            continue
                    if img is None:
                        self._bad.add(where, "no image member")
                    elif not cap:
                        self._bad.add(where, "empty caption")
                    else:
                        self.samples.append((sid, img.name, cap, index))
                    index += 1
        self.num_samples = index

    def __len__(self):
        return len(self.samples)

    def _tar(self, sid: int) -> tarfile.TarFile:
        # one handle per shard per process (DataLoader workers re-open their own)
        key = (os.getpid(), sid)
        t = self._open.get(key)
        if t is None:
            t = tarfile.open(self.shards[sid])
            self._open[key] = t
        return t

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_open"] = {}
        return d

    def __getitem__(self, i: int):
        sid, member, cap, idx = self.samples[i]
        data = self._tar(sid).extractfile(member).read()
        image = self.transform(_load_image(data, f"{self.shards[sid]}:{member}"))
        text = self.tokenizer([cap])[0] if self.tokenizer is not None else cap
        return image, text, idx


class LabelledImages(_ReportsBadSamples):
    """Labelled images from a class-per-folder tree (``root/<class>/*.jpg``) or a
    CSV with image-path and label columns.

    ``classes`` are sorted folder names (or sorted distinct labels of the CSV);
    :meth:`prompts` turns them into text prompts (``template.format(name)``, with
    underscores as spaces). ``dataset[i]`` returns ``(image, label, index)``.
    """

    def __init__(self, root: Optional[str] = None, csv_path: Optional[str] = None, img_key: str = "filepath",
                 label_key: str = "label", transform: Optional[Callable] = None, on_error: str = "skip",
                 verify: bool = True, classes: Optional[Sequence[str]] = None):
        if (root is None) == (csv_path is None):
            raise ValueError("LabelledImages: give exactly one of root (class folders) or csv_path")
        self.transform = transform or default_transform()
        self._bad = _BadSamples(on_error)
        items: List[Tuple[str, str]] = []
        if root is not None:
            if not os.path.isdir(root):
                raise FileNotFoundError(f"LabelledImages: root {root!r} is not a folder")
            for cls in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
                for fn in sorted(os.listdir(os.path.join(root, cls))):
                    if fn.lower().endswith(IMAGE_EXTS):
                        items.append((os.path.join(root, cls, fn), cls))
        else:
            if not os.path.isfile(csv_path):
                raise FileNotFoundError(f"LabelledImages: csv_path {csv_path!r} does not exist")
            base = os.path.dirname(os.path.abspath(csv_path))
            with open(csv_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if csv_path.endswith(".tsv") else ",")
                for key, what in ((img_key, "img_key"), (label_key, "label_key")):
                    if key not in (reader.fieldnames or []):
                        raise ValueError(f"LabelledImages: {what}={key!r} is not a column of {csv_path}")
                for row in reader:
                    p = row[img_key]
                    items.append((p if os.path.isabs(p) else os.path.join(base, p), row[label_key].strip()))
        self.classes = list(classes) if classes is not None else sorted({c for _, c in items})
        cls_index = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int, int]] = []
        for i, (p, c) in enumerate(items):
            if c not in cls_index:
                self._bad.add(p, f"label {c!r} not in classes")
                continue
            if verify:
                why = _check_image_file(p)
                if why:
                    self._bad.add(p, why)
                    continue
            self.samples.append((p, cls_index[c], i))

    @property
    def labels(self) -> List[int]:
        return [s[1] for s in self.samples]

    def prompts(self, template: str = "a photo of a {}.") -> List[str]:
        return [template.format(c.replace("_", " ")) for c in self.classes]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int):
        p, y, idx = self.samples[i]
        return self.transform(_load_image(p, p)), y, idx


class CIRTriplets(_ReportsBadSamples):
    """Composed image retrieval triplets in the FashionIQ or CIRR layout.

    FashionIQ (``layout="fashioniq"``): ``captions/cap.<category>.<split>.json``
    lists ``{"candidate": id, "target": id, "captions": [c1, c2]}``; images are
    ``images/<id>.<ext>``. The two captions are joined with " and " (the
    common practice). CIRR (``layout="cirr"``): ``captions/cap.rc2.<split>.json``
    lists ``{"pairid", "reference", "target_hard", "caption", "img_set": {"members": [...]}}``
    and ``image_splits/split.rc2.<split>.json`` maps image names to paths.

    The gallery is every image named by the split (``self.gallery``); a
    triplet gives ``(ref_image, text, target_image, ref_index, target_index)``
    with indices into the gallery, and :meth:`subsets` gives CIRR's candidate
    sets (gallery indices) for Recall_subset@K.
    """

    def __init__(self, root: str, split: str = "val", layout: str = "fashioniq",
                 categories: Sequence[str] = ("dress", "shirt", "toptee"), transform: Optional[Callable] = None,
                 on_error: str = "skip", verify: bool = True):
        if layout not in ("fashioniq", "cirr"):
            raise ValueError(f"layout must be 'fashioniq' or 'cirr', got {layout!r}")
        self.root, self.split, self.layout = root, split, layout
        self.transform = transform or default_transform()
        self._bad = _BadSamples(on_error)
        self.gallery: List[str] = []  # image names
        self.paths: Dict[str, str] = {}
        self.triplets: List[Tuple[str, str, str, List[str]]] = []  # ref, text, target, subset members
        if layout == "fashioniq":
            for cat in categories:
                cap_file = os.path.join(root, "captions", f"cap.{cat}.{split}.json")
                if not os.path.isfile(cap_file):
                    raise FileNotFoundError(f"CIRTriplets: {cap_file} does not exist")
                for e in json.load(open(cap_file)):
                    text = " and ".join(c.strip() for c in e.get("captions", []) if c.strip())
                    self._add(e["candidate"], text, e["target"], [], cap_file)
        else:
            cap_file = os.path.join(root, "captions", f"cap.rc2.{split}.json")
            split_file = os.path.join(root, "image_splits", f"split.rc2.{split}.json")
            for fpath in (cap_file, split_file):
                if not os.path.isfile(fpath):
                    raise FileNotFoundError(f"CIRTriplets: {fpath} does not exist")
            name_to_rel = json.load(open(split_file))
            for name, rel in name_to_rel.items():
                self.paths[name] = os.path.join(root, rel)
            for e in json.load(open(cap_file)):
                members = list(e.get("img_set", {}).get("members", []))
                self._add(e["reference"], e.get("caption", "").strip(), e.get("target_hard", ""), members, cap_file)
        names = set()
        for ref, _, tgt, members in self.triplets:
            names.update([ref, tgt, *members])
        self.gallery = sorted(names)
        self.gallery_index = {n: i for i, n in enumerate(self.gallery)}

    def _path(self, name: str) -> Optional[str]:
        if name in self.paths:
            return self.paths[name]
        for ext in (".png", ".jpg", ".jpeg", ".webp"):
            p = os.path.join(self.root, "images", name + ext)
            if os.path.isfile(p):
                self.paths[name] = p
                return p
        return None

    def _add(self, ref: str, text: str, tgt: str, members: List[str], where: str) -> None:
        if not text:
            self._bad.add(f"{where} ({ref} -> {tgt})", "empty modification text")
            return
        for n in (ref, tgt):
            p = self._path(n) if n else None
            if p is None:
                self._bad.add(f"{where} ({ref} -> {tgt})", f"image {n!r} not found")
                return
            why = _check_image_file(p)
            if why:
                self._bad.add(f"{where} ({p})", why)
                return
        self.triplets.append((ref, text, tgt, members))

    def __len__(self):
        return len(self.triplets)

    def image(self, name):
        """An image by gallery index (int) or by name."""
        if isinstance(name, int):
            name = self.gallery[name]
        p = self.paths[name] if name in self.paths else self._path(name)
        return self.transform(_load_image(p, p))

    def __getitem__(self, i: int):
        ref, text, tgt, _ = self.triplets[i]
        return self.image(ref), text, self.image(tgt), *self.gallery_indices(i)

    def gallery_indices(self, i: int) -> Tuple[int, int]:
        """(reference, target) gallery indices of triplet ``i``, without decoding the images."""
        ref, _, tgt, _ = self.triplets[i]
        return self.gallery_index[ref], self.gallery_index[tgt]

    def subsets(self) -> Optional[torch.Tensor]:
        """CIRR candidate sets as gallery indices [num_triplets, S] (None for FashionIQ)."""
        if self.layout != "cirr" or not self.triplets:
            return None
        rows = [[self.gallery_index[m] for m in members] for _, _, _, members in self.triplets]
        width = max(len(r) for r in rows)
        # pad with the first member (a duplicate changes no ranking)
        return torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long)
