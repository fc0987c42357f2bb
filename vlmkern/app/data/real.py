"""Real images that are already on the machine: nothing is downloaded, ever.

Five sources, each read from an installed package (see :func:`sources` and
``docs/DATA.md`` for sizes, splits and licences):

* ``sklearn-digits``  - 1,797 real 8x8 handwritten digits inside the
  scikit-learn wheel (:func:`sklearn.datasets.load_digits`).
* ``sklearn-photos``  - the two photographs scikit-learn ships (china.jpg,
  flower.jpg), read from the installed package folder.
* ``skimage-photos``  - photographs scikit-image ships *inside* its wheel
  (astronaut, camera, chelsea, coffee, ...). They are read straight from the
  package folder: skimage's own fetchers are never called, so nothing can
  reach for the network (pooch); a photo whose file is absent is skipped.
* ``fashion-mnist``   - the Debian package ``dataset-fashion-mnist``: all
  70,000 28x28 images as idx ``.gz`` files (:func:`read_idx`).
* ``tuxpaint-stamps`` - the Debian package ``tuxpaint-stamps-default``: about
  800 PNG cut-outs (photos and drawings with alpha), 785 of them with an
  English sentence caption in ``<name>.txt`` (:func:`scan_stamps`).

Loaders return datasets with the interfaces of :mod:`vlmkern.app.data.synthetic`:
labelled sets yield ``(image, label, index)`` and have ``.labels``,
``.classes`` and ``.prompts(template)``; pair sets yield ``(image, caption,
index)`` with stable indices. Images are RGB ``[3, S, S]`` float32,
CLIP-normalised (:func:`vlmkern.app.data.synthetic.normalize`); every choice
(splits, subsampling, backgrounds, crops) is a pure function of ``seed``.

A missing source raises :class:`SourceUnavailable`, whose message names the
package and the command that installs it; the aggregate helpers
(:func:`caption_pairs` with ``sources=None``, :func:`available`) skip it with
a one-line notice instead.

The Debian data is looked up in its standard folders; ``VLMKERN_FASHION_MNIST_DIR``
and ``VLMKERN_TUXPAINT_STAMPS_DIR`` (or the ``root=`` arguments) point elsewhere.
"""

from __future__ import annotations

import colorsys
import gzip
import importlib.util
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .synthetic import normalize

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"
FASHION_ENV = "VLMKERN_FASHION_MNIST_DIR"
TUXPAINT_ENV = "VLMKERN_TUXPAINT_STAMPS_DIR"

DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
# noun phrases for prompts and captions ("a photo of a pair of trousers.")
FASHION_PHRASES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                   "a sneaker", "a bag", "an ankle boot")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# What each top-level Tux Paint stamp folder holds, as a noun phrase for prompts.
TUXPAINT_CATEGORY_PHRASES = {
    "animals": "an animal", "cartoon": "a cartoon character", "clothes": "a piece of clothing", "food": "food",
    "hobbies": "a musical instrument or hobby item", "household": "a household object",
    "medical": "a medical instrument", "military": "a military object", "naturalforces": "a force of nature",
    "people": "a person", "plants": "a plant", "seasonal": "a holiday decoration", "space": "something in space",
    "sports": "sports equipment", "symbols": "a symbol", "town": "a road sign or town building",
    "vehicles": "a vehicle",
}


@dataclass(frozen=True)
class Photo:
    source: str    # "sklearn-photos" or "skimage-photos"
    name: str      # short id, e.g. "chelsea"
    file: str      # file name inside the package's data folder
    subject: str   # what it shows, as a noun phrase ("a cat")
    licence: str


# Only photographs whose licence the shipping package states; skimage's
# motorcycle (Middlebury) and moon (no licence given) are left out on purpose.
PHOTOS = (
    Photo("sklearn-photos", "china", "china.jpg", "a chinese temple tower above a lake",
          "CC BY 2.0 (danielbuechele, Flickr)"),
    Photo("sklearn-photos", "flower", "flower.jpg", "an orange dahlia flower", "CC BY 2.0 (vultilion, Flickr)"),
    Photo("skimage-photos", "astronaut", "astronaut.png", "an astronaut", "public domain (NASA)"),
    Photo("skimage-photos", "camera", "camera.png", "a man with a camera on a tripod", "CC0 (Lav Varshney)"),
    Photo("skimage-photos", "chelsea", "chelsea.png", "a cat", "CC0 (Stefan van der Walt)"),
    Photo("skimage-photos", "coffee", "coffee.png", "a cup of coffee", "CC0 (Rachel Michetti)"),
    Photo("skimage-photos", "coins", "coins.png", "ancient greek coins",
          "no known copyright restrictions (Brooklyn Museum)"),
    Photo("skimage-photos", "rocket", "rocket.jpg", "a rocket on its launch pad", "public domain (SpaceX)"),
    Photo("skimage-photos", "hubble_deep_field", "hubble_deep_field.jpg", "galaxies in deep space",
          "public domain (NASA)"),
    Photo("skimage-photos", "retina", "retina.jpg", "the retina of a human eye", "CC0 (Mikael Häggström)"),
    Photo("skimage-photos", "immunohistochemistry", "ihc.png", "stained tissue under a microscope",
          "no known copyright restrictions (CMMI)"),
    Photo("skimage-photos", "brick", "brick.png", "a brick wall", "CC0 (CC0Textures)"),
    Photo("skimage-photos", "grass", "grass.png", "grass", "CC0 (linolafett, DeviantArt)"),
    Photo("skimage-photos", "gravel", "gravel.png", "gravel", "CC0 (CC0Textures)"),
)

DIGIT_TEMPLATES = ("a handwritten digit {name}.", "a photo of the handwritten number {name}.",
                   "the digit {name}, written by hand.", "a small blurry image of a handwritten {name}.")
FASHION_TEMPLATES = ("a photo of {a_name}.", "a black and white photo of {a_name}.",
                     "a small picture of {a_name}.", "a product photo of {a_name}.")
PHOTO_TEMPLATES = ("a crop of a photograph of {subject}.", "part of a photo of {subject}.",
                   "a close-up detail from a photograph of {subject}.", "a cropped photo showing {subject}.")


# --------------------------------------------------------------------------------------------------------------------
# availability


class SourceUnavailable(RuntimeError):
    """A data source is not installed; the message says which package and how to install it."""

    def __init__(self, name: str, why: str, how_to_install: str):
        self.name, self.why, self.how_to_install = name, why, how_to_install
        super().__init__(f"data source {name!r} is not available: {why}. Install it with: {how_to_install}")


def _notice(msg: str) -> None:
    print(f"[vlmkern.app.data] {msg}", file=sys.stderr)


def _package_dir(module: str) -> Optional[str]:
    """Folder of an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def fashion_root(root: Optional[str] = None) -> str:
    return root or os.environ.get(FASHION_ENV) or FASHION_DIR


def tuxpaint_root(root: Optional[str] = None) -> str:
    return root or os.environ.get(TUXPAINT_ENV) or TUXPAINT_DIR


def _photo_dir(source: str) -> Optional[str]:
    if source == "sklearn-photos":
        d = _package_dir("sklearn")
        return os.path.join(d, "datasets", "images") if d else None
    d = _package_dir("skimage")
    return os.path.join(d, "data") if d else None


def _photos_present(source: str) -> List[Photo]:
    d = _photo_dir(source)
    if d is None:
        return []
    return [p for p in PHOTOS if p.source == source and os.path.isfile(os.path.join(d, p.file))]


_HOW = {
    "sklearn-digits": "pip install scikit-learn==1.9.1  (the digits ship inside the wheel)",
    "sklearn-photos": "pip install scikit-learn==1.9.1  (the photos ship inside the wheel)",
    "skimage-photos": "pip install scikit-image==0.26.0  (the photos ship inside the wheel)",
    "fashion-mnist": f"sudo apt-get install dataset-fashion-mnist  (or set {FASHION_ENV} to a folder with the "
                     "four Fashion-MNIST idx .gz files)",
    "tuxpaint-stamps": f"sudo apt-get install tuxpaint-stamps-default  (or set {TUXPAINT_ENV} to a Tux Paint "
                       "stamps folder)",
}
_LICENCE = {
    "sklearn-digits": "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits); shipped in scikit-learn (BSD-3)",
    "sklearn-photos": "CC BY 2.0 (Flickr photographers, see scikit-learn's images/README.txt)",
    "skimage-photos": "public domain / CC0 / no known copyright restrictions, per photo (skimage.data docstrings)",
    "fashion-mnist": "MIT (Zalando Research)",
    "tuxpaint-stamps": "GPL-2.0-or-later (Tux Paint stamps, Bill Kendrick and contributors)",
}
SOURCE_NAMES = ("sklearn-digits", "sklearn-photos", "skimage-photos", "fashion-mnist", "tuxpaint-stamps")
_ALIASES = {"digits": "sklearn-digits", "fashion": "fashion-mnist", "tuxpaint": "tuxpaint-stamps",
            "stamps": "tuxpaint-stamps"}


def _status(name: str) -> Tuple[bool, str, int, Optional[str]]:
    """(available, why-not, count, path) without decoding anything big."""
    if name == "sklearn-digits":
        d = _package_dir("sklearn")
        if d is None:
            return False, "scikit-learn is not installed", 0, None
        path = os.path.join(d, "datasets", "data", "digits.csv.gz")
        if not os.path.isfile(path):
            return False, f"{path} is missing from the scikit-learn install", 0, path
        return True, "", 1797, path
    if name in ("sklearn-photos", "skimage-photos"):
        pkg = "scikit-learn" if name == "sklearn-photos" else "scikit-image"
        d = _photo_dir(name)
        if d is None:
            return False, f"{pkg} is not installed", 0, None
        n = len(_photos_present(name))
        if n == 0:
            return False, f"no photographs found in {d}", 0, d
        return True, "", n, d
    if name == "fashion-mnist":
        root = fashion_root()
        missing = [f for pair in FASHION_FILES.values() for f in pair if not os.path.isfile(os.path.join(root, f))]
        if missing:
            return False, f"{os.path.join(root, missing[0])} not found", 0, root
        return True, "", 70_000, root
    if name == "tuxpaint-stamps":
        root = tuxpaint_root()
        if not os.path.isdir(root):
            return False, f"{root} not found", 0, root
        n = len(scan_stamps(root))
        if n == 0:
            return False, f"no captioned PNG stamps under {root}", 0, root
        return True, "", n, root
    raise KeyError(f"unknown data source {name!r}; known: {', '.join(SOURCE_NAMES)}")


def _canonical(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in SOURCE_NAMES:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(SOURCE_NAMES)} "
                       f"(aliases: {', '.join(_ALIASES)}, photos)")
    return name


def sources() -> List[Dict[str, object]]:
    """One dict per source: ``name, available, count, licence, how_to_install, path`` (and ``why``
    when unavailable). Counts are images (photos: photographs; tuxpaint: captioned stamps)."""
    out = []
    for name in SOURCE_NAMES:
        ok, why, count, path = _status(name)
        row: Dict[str, object] = {"name": name, "available": ok, "count": count, "licence": _LICENCE[name],
                                  "how_to_install": _HOW[name], "path": path}
        if not ok:
            row["why"] = why
        out.append(row)
    return out


def require(name: str) -> str:
    """The canonical source name; raises :class:`SourceUnavailable` if it is not installed."""
    name = _canonical(name)
    ok, why, _, _ = _status(name)
    if not ok:
        raise SourceUnavailable(name, why, _HOW[name])
    return name


def available(names: Optional[Sequence[str]] = None, quiet: bool = False) -> List[str]:
    """The installed sources among ``names`` (default: all), each missing one noted in one line."""
    out = []
    for n in (names if names is not None else SOURCE_NAMES):
        n = _canonical(n)
        ok, why, _, _ = _status(n)
        if ok:
            out.append(n)
        elif not quiet:
            _notice(f"skipping {n}: {why} (install: {_HOW[n]})")
    return out


# --------------------------------------------------------------------------------------------------------------------
# file formats

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped (``.gz``) or raw.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then
    each dimension as a big-endian uint32, then the data, big-endian, C order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    n = int(np.prod(shape, dtype=np.int64)) if ndim else 1
    start = 4 + 4 * ndim
    if len(data) - start != n * dtype.itemsize:
        raise ValueError(f"{path}: idx header says shape {shape} ({n * dtype.itemsize} bytes of data) "
                         f"but the file has {len(data) - start}")
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=start).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True) if dtype.byteorder == ">" else arr.copy()


# "fr.utf8=Une grenouille." and the like: a translation line of a stamp's .txt
_TRANSLATION = re.compile(r"^[A-Za-z]{2,3}([_@][A-Za-z0-9]+)*\.(utf8|UTF-8|utf-8)=")


def parse_stamp_caption(path: str) -> Optional[str]:
    """The English caption of a Tux Paint stamp description (``<name>.txt``).

    Its first line is the English sentence ("A frog."); other lines are
    translations (``fr.utf8=Une grenouille.``). Returns None when the file has
    no English line."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace").lstrip("\ufeff")
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if _TRANSLATION.match(line):
            return None
        return " ".join(line.split())
    return None


@dataclass(frozen=True)
class Stamp:
    path: str       # the PNG
    caption: str    # English sentence
    category: str   # top-level folder ("animals")
    group: str      # folder below the category root, "" for stamps directly in it ("birds")
    name: str       # file stem ("albino_peahen")


_scan_cache: Dict[Tuple[str, float], List[Stamp]] = {}


def scan_stamps(root: Optional[str] = None) -> List[Stamp]:
    """All captioned PNG stamps under a Tux Paint stamps folder, sorted by path.

    A stamp is ``<category>/.../<name>.png`` with a ``<name>.txt`` whose first
    line is English. Left out: pre-mirrored/flipped copies (``_mirror.png``,
    ``_flip.png``), PNGs without a description, SVG-only stamps, PNGs placed
    directly in ``root`` (no category)."""
    root = os.path.abspath(tuxpaint_root(root))
    key = (root, os.path.getmtime(root) if os.path.isdir(root) else -1.0)
    if key in _scan_cache:
        return _scan_cache[key]
    stamps: List[Stamp] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            continue
        parts = rel.split(os.sep)
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext.lower() != ".png" or stem.endswith(("_mirror", "_flip")):
                continue
            txt = os.path.join(dirpath, stem + ".txt")
            if not os.path.isfile(txt):
                continue
            cap = parse_stamp_caption(txt)
            if not cap:
                continue
            stamps.append(Stamp(os.path.join(dirpath, fn), cap, parts[0], "/".join(parts[1:]), stem))
    stamps.sort(key=lambda s: s.path)
    _scan_cache[key] = stamps
    return stamps


# --------------------------------------------------------------------------------------------------------------------
# decoding and caches (once per process)

_lock = threading.Lock()
_fashion_cache: Dict[Tuple[str, str], Tuple[np.ndarray, np.ndarray]] = {}
_digits_cache: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
_stamp_cache: Dict[Tuple[str, int], Tuple[np.ndarray, float]] = {}
_photo_cache: Dict[Tuple[str, int], np.ndarray] = {}


def load_fashion_arrays(split: str = "train", root: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images uint8 [N, 28, 28], labels int64 [N])``; split "train" (60k) or "test" (10k)."""
    if split not in FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = fashion_root(root)
    img_f, lab_f = (os.path.join(d, f) for f in FASHION_FILES[split])
    for p in (img_f, lab_f):
        if not os.path.isfile(p):
            raise SourceUnavailable("fashion-mnist", f"{p} not found", _HOW["fashion-mnist"])
    key = (os.path.abspath(d), split)
    with _lock:
        if key not in _fashion_cache:
            x, y = read_idx(img_f), read_idx(lab_f)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{img_f}, {lab_f}: expected [N, H, W] images and [N] labels, "
                                 f"got {x.shape} and {y.shape}")
            _fashion_cache[key] = (x, y.astype(np.int64))
        return _fashion_cache[key]


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits ``(images float32 [1797, 8, 8] in [0, 1], labels int64)``; ink is bright."""
    require("sklearn-digits")
    with _lock:
        if "d" not in _digits_cache:
            from sklearn.datasets import load_digits

            b = load_digits()
            _digits_cache["d"] = ((np.asarray(b.images, dtype=np.float32) / 16.0).clip(0, 1),
                                  np.asarray(b.target, dtype=np.int64))
        return _digits_cache["d"]


def _pil():
    from PIL import Image

    return Image


def _stamp_rgba(path: str, box: int) -> Tuple[np.ndarray, float]:
    """A stamp decoded once per process, fitted inside ``box x box`` (aspect kept):
    ``(uint8 RGBA [h, w, 4], alpha-weighted mean luminance in [0, 1])``."""
    key = (path, box)
    hit = _stamp_cache.get(key)
    if hit is not None:
        return hit
    Image = _pil()
    with Image.open(path) as im:
        im = im.convert("RGBA")
        w, h = im.size
        s = box / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)  # premultiplied-alpha resampling
        arr = np.asarray(im, dtype=np.uint8).copy()
    a = arr[..., 3].astype(np.float32) / 255.0
    lum = (arr[..., :3].astype(np.float32) / 255.0) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    mean_lum = float((lum * a).sum() / max(a.sum(), 1e-6))
    _stamp_cache[key] = (arr, mean_lum)
    return arr, mean_lum


def _photo_array(photo: Photo, min_side: int) -> np.ndarray:
    """A photograph as float32 RGB ``[H, W, 3]`` in [0, 1], its shorter side
    scaled down to ``min_side`` (never up); decoded once per process."""
    key = (photo.name, min_side)
    hit = _photo_cache.get(key)
    if hit is not None:
        return hit
    d = _photo_dir(photo.source)
    if d is None or not os.path.isfile(os.path.join(d, photo.file)):
        raise SourceUnavailable(photo.source, f"photo {photo.file} not found", _HOW[photo.source])
    Image = _pil()
    with Image.open(os.path.join(d, photo.file)) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min_side / min(w, h)
        if s < 1:
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    _photo_cache[key] = arr
    return arr


# --------------------------------------------------------------------------------------------------------------------
# rendering helpers


def _gen(seed: int, index: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + index * 7919 + stream * 104_729 + 12_345) % (2**63 - 1))
    return g


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] -> [C, size, size] (bilinear, antialiased when shrinking)."""
    if img.shape[-2:] == (size, size):
        return img
    return F.interpolate(img.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


def _gray_to_rgb(a: np.ndarray, size: int) -> torch.Tensor:
    """[H, W] float in [0, 1] -> float32 [3, size, size] in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).unsqueeze(0)
    return _resize(t, size).clamp_(0, 1).expand(3, size, size).contiguous()


def _background(g: torch.Generator, size: int, dark: bool, varied: bool) -> torch.Tensor:
    if not varied:
        return torch.full((3, size, size), 0.12 if dark else 0.9)
    u = torch.rand(6, generator=g).tolist()
    v = (0.08 + 0.25 * u[2]) if dark else (0.72 + 0.25 * u[2])
    c0 = torch.tensor(colorsys.hsv_to_rgb(u[0], 0.1 + 0.4 * u[1], v))
    c1 = torch.tensor(colorsys.hsv_to_rgb((u[0] + 0.08 * (u[3] - 0.5)) % 1.0, 0.1 + 0.4 * u[1],
                                          min(1.0, max(0.0, v + 0.15 * (u[4] - 0.5)))))
    ang = 2 * np.pi * u[5]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    ramp = ((xs - 0.5) * float(np.cos(ang)) + (ys - 0.5) * float(np.sin(ang)) + 0.71) / 1.42
    img = c0.view(3, 1, 1) + (c1 - c0).view(3, 1, 1) * ramp
    img = img + 0.015 * torch.randn(3, size, size, generator=g)
    return img.clamp(0, 1)


def render_stamp(stamp: Stamp, size: int = 32, seed: int = 0, index: int = 0, background: str = "varied",
                 fill: float = 0.85) -> torch.Tensor:
    """A stamp composited onto a background: float32 ``[3, size, size]`` in [0, 1].

    The cut-out is fitted into ``fill`` of the canvas, shifted a little, and laid
    (alpha-blended) on a light background, or a dark one when the stamp itself is
    light; ``background="varied"`` draws the colour and a gentle gradient from
    ``(seed, index)``, ``"plain"`` uses flat grey."""
    if background not in ("varied", "plain"):
        raise ValueError(f"background must be 'varied' or 'plain', got {background!r}")
    box = max(1, int(round(fill * size)))
    rgba, lum = _stamp_rgba(stamp.path, box)
    g = _gen(seed, index, 11)
    img = _background(g, size, dark=lum > 0.62, varied=background == "varied")
    h, w = rgba.shape[:2]
    jx, jy = (torch.rand(2, generator=g) - 0.5).tolist()
    x0 = int(round((size - w) / 2 + jx * (size - w) / 2))
    y0 = int(round((size - h) / 2 + jy * (size - h) / 2))
    x0, y0 = min(max(x0, 0), size - w), min(max(y0, 0), size - h)
    fg = torch.from_numpy(rgba).permute(2, 0, 1).float() / 255.0
    a = fg[3:4]
    region = img[:, y0:y0 + h, x0:x0 + w]
    img[:, y0:y0 + h, x0:x0 + w] = a * fg[:3] + (1 - a) * region
    return img.clamp(0, 1)


def _photo_crop(photo: Photo, box: Tuple[float, float, float], size: int) -> torch.Tensor:
    """Square crop ``(x, y, side)`` in fractions of the shorter side -> float32 [3, size, size]."""
    arr = _photo_array(photo, max(160, 4 * size))
    h, w = arr.shape[:2]
    side = max(2, int(round(box[2] * min(h, w))))
    x0 = int(round(box[0] * (w - side)))
    y0 = int(round(box[1] * (h - side)))
    crop = torch.from_numpy(np.ascontiguousarray(arr[y0:y0 + side, x0:x0 + side])).permute(2, 0, 1)
    return _resize(crop, size).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# splits and long tails


def long_tail_counts(num_classes: int, head: int, zipf: float = 1.5, min_per_class: int = 1) -> List[int]:
    """Per-rank training counts of a Zipf-like long tail: rank ``r`` gets
    ``max(min_per_class, round(head / (r + 1) ** zipf))``."""
    if head < 1 or num_classes < 1:
        raise ValueError(f"need head >= 1 and num_classes >= 1, got {head}, {num_classes}")
    return [max(min_per_class, int(round(head / (r + 1) ** zipf))) for r in range(num_classes)]


def _perm(n: int, g: torch.Generator) -> List[int]:
    return torch.randperm(n, generator=g).tolist()


def split_by_class(labels: Sequence[int], num_classes: int, seed: int, val_per_class: int,
                   val_labels: Optional[Sequence[int]] = None, train_per_class: Optional[int] = None,
                   long_tail: bool = False, zipf: float = 1.5, min_per_class: int = 1,
                   shots: Optional[int] = None) -> Tuple[List[int], List[int], List[int]]:
    """Deterministic ``(train_idx, val_idx, class_rank)`` over a labelled pool.

    Validation takes ``val_per_class`` samples of every class: from the pool
    itself, or from a separate pool with ``val_labels`` (indices then refer to
    it). Training takes from what is left of each class (in a seeded order):

    * default: all of it, at most ``train_per_class``;
    * ``long_tail``: the class ranked ``r`` in a seeded class order gets
      :func:`long_tail_counts` with ``head`` = ``train_per_class`` or the smallest
      class's leftover (so that every count is achievable);
    * ``shots=k``: exactly ``k`` per class (few-shot).

    ``class_rank[c]`` is class ``c``'s rank in the long-tail order (0 = head).
    Both index lists are sorted (source order)."""
    if long_tail and shots is not None:
        raise ValueError("choose either long_tail or shots, not both")
    labels = np.asarray(labels, dtype=np.int64)
    g = _gen(seed, 0, 21)
    order = np.asarray(_perm(len(labels), g), dtype=np.int64)
    per_class = [order[labels[order] == c].tolist() for c in range(num_classes)]
    if val_labels is not None:
        vl = np.asarray(val_labels, dtype=np.int64)
        vorder = np.asarray(_perm(len(vl), g), dtype=np.int64)
        val_pool = [vorder[vl[vorder] == c].tolist() for c in range(num_classes)]
        train_pool = per_class
    else:
        val_pool = [p[:val_per_class] for p in per_class]
        train_pool = [p[val_per_class:] for p in per_class]
    val_idx: List[int] = []
    for c in range(num_classes):
        if len(val_pool[c]) < val_per_class:
            raise ValueError(f"class {c} has only {len(val_pool[c])} validation candidates, "
                             f"{val_per_class} asked")
        val_idx += val_pool[c][:val_per_class]
    avail = [len(p) for p in train_pool]
    rank_order = _perm(num_classes, g)  # rank_order[r] = class at rank r
    class_rank = [0] * num_classes
    for r, c in enumerate(rank_order):
        class_rank[c] = r
    if shots is not None:
        want = [shots] * num_classes
    elif long_tail:
        head = train_per_class if train_per_class is not None else min(avail)
        by_rank = long_tail_counts(num_classes, head, zipf, min_per_class)
        want = [by_rank[class_rank[c]] for c in range(num_classes)]
    else:
        want = [a if train_per_class is None else min(a, train_per_class) for a in avail]
    train_idx: List[int] = []
    for c in range(num_classes):
        if want[c] > avail[c]:
            raise ValueError(f"class {c} has {avail[c]} training samples, {want[c]} asked "
                             f"(shots / train_per_class / long-tail head too large)")
        if want[c] < 1:
            raise ValueError(f"class {c} would get no training samples")
        train_idx += train_pool[c][:want[c]]
    return sorted(train_idx), sorted(val_idx), class_rank


# --------------------------------------------------------------------------------------------------------------------
# datasets


class RealLabelledDataset(torch.utils.data.Dataset):
    """``(image, label, index)`` over real images; ``.labels``, ``.classes``, ``.prompts(template)``.

    ``render(i)`` gives the float32 ``[3, S, S]`` image in [0, 1]; items are
    CLIP-normalised. ``source_index[i]`` is the sample's row in its source
    (e.g. the Fashion-MNIST file) and ``class_rank`` the long-tail rank of each
    class (0 = most frequent by construction)."""

    def __init__(self, name: str, labels: List[int], classes: Sequence[str], class_phrases: Sequence[str],
                 template: str, image_size: int, render: Callable[[int], torch.Tensor],
                 source_index: List[int], class_rank: Optional[List[int]] = None):
        self.name, self.labels, self.classes = name, list(labels), list(classes)
        self.class_phrases, self.template, self.image_size = list(class_phrases), template, image_size
        self._render, self.source_index = render, list(source_index)
        self.class_rank = list(class_rank) if class_rank is not None else None

    def __len__(self):
        return len(self.labels)

    def prompts(self, template: Optional[str] = None) -> List[str]:
        """One text prompt per class; ``template`` may use ``{name}`` (class
        name) and ``{a_name}`` (its noun phrase with an article)."""
        t = template or self.template
        return [t.format(name=n, a_name=p) for n, p in zip(self.classes, self.class_phrases)]

    def counts(self) -> List[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes)).tolist()

    def render(self, i: int) -> torch.Tensor:
        return self._render(i)

    def __getitem__(self, i):
        return normalize(self._render(i)), self.labels[i], i


class _ArrayRender:
    """Picklable renderer: gray images [N, H, W] in [0, 1] (float) or [0, 255] (uint8)."""

    def __init__(self, images: np.ndarray, size: int):
        self.images, self.size = images, size

    def __call__(self, i: int) -> torch.Tensor:
        a = self.images[i]
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a
        return _gray_to_rgb(a, self.size)


class _StampRender:
    def __init__(self, stamps: List[Stamp], size: int, seed: int, background: str):
        self.stamps, self.size, self.seed, self.background = stamps, size, seed, background

    def __call__(self, i: int) -> torch.Tensor:
        return render_stamp(self.stamps[i], self.size, self.seed, i, self.background)


def _labelled_from_pool(name, images, labels, val_images, val_labels, classes, phrases, template, seed, image_size,
                        val_per_class, train_per_class, long_tail, zipf, min_per_class, shots):
    tr, va, rank = split_by_class(labels, len(classes), seed, val_per_class, val_labels=val_labels,
                                  train_per_class=train_per_class, long_tail=long_tail, zipf=zipf,
                                  min_per_class=min_per_class, shots=shots)
    vimg = images if val_images is None else val_images
    vlab = labels if val_labels is None else val_labels
    train = RealLabelledDataset(name, [int(labels[i]) for i in tr], classes, phrases, template, image_size,
                                _ArrayRender(images[tr], image_size), tr, rank)
    val = RealLabelledDataset(name, [int(vlab[i]) for i in va], classes, phrases, template, image_size,
                              _ArrayRender(vimg[va], image_size), va, rank)
    return train, val


def digits_labelled(seed: int = 0, image_size: int = 32, val_per_class: int = 30,
                    train_per_class: Optional[int] = None, long_tail: bool = False, zipf: float = 1.5,
                    min_per_class: int = 1, shots: Optional[int] = None
                    ) -> Tuple[RealLabelledDataset, RealLabelledDataset]:
    """(train, val) over scikit-learn's 1,797 real handwritten digits, classes "zero".."nine".

    ``val_per_class`` digits of each class are held out (balanced validation,
    300 by default); training takes the rest (about 150 a class), optionally
    capped (``train_per_class``), long-tailed (``long_tail``, see
    :func:`split_by_class`) or few-shot (``shots``). Ink is bright on dark."""
    x, y = load_digits_arrays()
    phrases = [f"the digit {c}" for c in DIGIT_CLASSES]
    return _labelled_from_pool("sklearn-digits", x, y, None, None, DIGIT_CLASSES, phrases,
                               "a handwritten digit {name}.", seed, image_size, val_per_class, train_per_class,
                               long_tail, zipf, min_per_class, shots)


def fashion_labelled(seed: int = 0, image_size: int = 32, val_per_class: int = 100,
                     train_per_class: Optional[int] = None, long_tail: bool = False, zipf: float = 1.5,
                     min_per_class: int = 1, shots: Optional[int] = None, root: Optional[str] = None
                     ) -> Tuple[RealLabelledDataset, RealLabelledDataset]:
    """(train, val) over Fashion-MNIST: training from the official 60k training
    file (6,000 a class), validation ``val_per_class`` a class from the 10k test
    file (balanced, 1,000 by default). ``train_per_class``, ``long_tail`` and
    ``shots`` as in :func:`split_by_class` (the long-tail head is
    ``train_per_class``, or all 6,000). Objects are bright on black."""
    x, y = load_fashion_arrays("train", root)
    vx, vy = load_fashion_arrays("test", root)
    return _labelled_from_pool("fashion-mnist", x, y, vx, vy, FASHION_CLASSES, FASHION_PHRASES, "a photo of {a_name}.",
                               seed, image_size, val_per_class, train_per_class, long_tail, zipf, min_per_class,
                               shots)


def tuxpaint_labelled(seed: int = 0, image_size: int = 32, val_per_class: int = 2,
                      train_per_class: Optional[int] = None, shots: Optional[int] = None,
                      background: str = "varied", root: Optional[str] = None
                      ) -> Tuple[RealLabelledDataset, RealLabelledDataset]:
    """(train, val) over the captioned Tux Paint stamps, labelled by their top
    category folder ("animals", "symbols", ...): naturally long-tailed (symbols
    ~245 stamps, naturalforces 3). Validation takes ``val_per_class`` stamps of
    every category (balanced); categories with fewer than ``val_per_class + 1``
    stamps are dropped. Stamps are composited on backgrounds
    (:func:`render_stamp`; validation uses other background draws)."""
    r = tuxpaint_root(root)
    if not os.path.isdir(r) or not scan_stamps(r):
        raise SourceUnavailable("tuxpaint-stamps", f"no captioned PNG stamps under {r}", _HOW["tuxpaint-stamps"])
    stamps = scan_stamps(r)
    cats = sorted({s.category for s in stamps})
    sizes = {c: sum(s.category == c for s in stamps) for c in cats}
    classes = [c for c in cats if sizes[c] >= val_per_class + 1]
    dropped = [c for c in cats if c not in classes]
    if dropped:
        _notice(f"tuxpaint_labelled: dropping categories with < {val_per_class + 1} stamps: {', '.join(dropped)}")
    cid = {c: k for k, c in enumerate(classes)}
    pool = [s for s in stamps if s.category in cid]
    labels = [cid[s.category] for s in pool]
    tr, va, _ = split_by_class(labels, len(classes), seed, val_per_class, train_per_class=train_per_class,
                               shots=shots)
    phrases = [TUXPAINT_CATEGORY_PHRASES.get(c, c) for c in classes]
    # the natural frequency order is the long-tail rank
    counts = np.bincount(np.asarray([labels[i] for i in tr]), minlength=len(classes))
    order = sorted(range(len(classes)), key=lambda c: (-int(counts[c]), c))
    rank = [0] * len(classes)
    for rr, c in enumerate(order):
        rank[c] = rr

    def make(idx, bg_seed):
        st = [pool[i] for i in idx]
        return RealLabelledDataset("tuxpaint-stamps", [labels[i] for i in idx], classes, phrases,
                                   "a picture of {a_name}.", image_size,
                                   _StampRender(st, image_size, bg_seed, background), idx, rank)

    return make(tr, seed), make(va, seed + 7_777_777)


LABELLED_LOADERS: Dict[str, Callable[..., Tuple[RealLabelledDataset, RealLabelledDataset]]] = {
    "sklearn-digits": digits_labelled, "fashion-mnist": fashion_labelled, "tuxpaint-stamps": tuxpaint_labelled,
}


def labelled(name: str, **kwargs) -> Tuple[RealLabelledDataset, RealLabelledDataset]:
    """(train, val) from a named labelled source (``digits``, ``fashion``, ``tuxpaint`` or the full names);
    raises :class:`SourceUnavailable` when it is not installed."""
    n = require(name)
    if n not in LABELLED_LOADERS:
        raise KeyError(f"{n} has no labels; labelled sources: {', '.join(LABELLED_LOADERS)}")
    return LABELLED_LOADERS[n](**kwargs)


def labelled_pool_sizes(name: str, val_per_class: int = 2, root: Optional[str] = None) -> Tuple[int, Optional[int]]:
    """What a labelled source can supply per class, to size a split before asking for it:
    ``(train_min, val_min)``. With a separate validation file (Fashion-MNIST) ``train_min`` is the
    smallest class of the training file and ``val_min`` that of the test file; with one shared pool
    (digits, Tux Paint stamps) ``train_min`` is the smallest class of the pool (validation and
    training both come out of it) and ``val_min`` is None. ``val_per_class`` only matters for Tux
    Paint (categories with fewer than ``val_per_class + 1`` stamps are dropped, as in
    :func:`tuxpaint_labelled`). Raises :class:`SourceUnavailable` when the source is missing."""
    n = _canonical(name)  # each loader below raises SourceUnavailable for a missing source
    if n == "sklearn-digits":
        _, y = load_digits_arrays()
        return int(np.bincount(y, minlength=len(DIGIT_CLASSES)).min()), None
    if n == "fashion-mnist":
        _, y = load_fashion_arrays("train", root)
        _, vy = load_fashion_arrays("test", root)
        k = len(FASHION_CLASSES)
        return int(np.bincount(y, minlength=k).min()), int(np.bincount(vy, minlength=k).min())
    if n == "tuxpaint-stamps":
        r = tuxpaint_root(root)
        stamps = scan_stamps(r) if os.path.isdir(r) else []
        if not stamps:
            raise SourceUnavailable(n, f"no captioned PNG stamps under {r}", _HOW[n])
        sizes = [sum(s.category == c for s in stamps) for c in sorted({s.category for s in stamps})]
        kept = [m for m in sizes if m >= val_per_class + 1]
        if not kept:
            raise SourceUnavailable(n, f"no category has {val_per_class + 1} stamps", _HOW[n])
        return min(kept), None
    raise KeyError(f"{n} has no labels; labelled sources: {', '.join(LABELLED_LOADERS)}")


def first_labelled(prefer: Sequence[str] = ("fashion-mnist", "sklearn-digits"), **kwargs
                   ) -> Tuple[RealLabelledDataset, RealLabelledDataset]:
    """(train, val) from the first installed source in ``prefer`` (missing ones noted in one line each)."""
    for n in prefer:
        n = _canonical(n)
        ok, why, _, _ = _status(n)
        if ok:
            return labelled(n, **kwargs)
        _notice(f"skipping {n}: {why} (install: {_HOW[n]})")
    raise SourceUnavailable(", ".join(prefer), "none of them is installed", "; ".join(_HOW[_canonical(n)]
                                                                                        for n in prefer))


# --------------------------------------------------------------------------------------------------------------------
# caption pairs


@dataclass(frozen=True)
class _Item:
    kind: str                    # "stamp" | "digit" | "fashion" | "photo"
    key: int                     # row in the per-kind store (stamp list, image array, photo list)
    caption: str
    row: int                     # the sample's row in its source (stamp list, digits, Fashion-MNIST file, photo)
    box: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # photo crops only


class RealPairsDataset(torch.utils.data.Dataset):
    """Image-caption pairs ``(image, caption, index)`` from real images, with
    stable indices (position in the dataset). ``source[i]`` names the item's
    source; ``render(i)`` gives the [0, 1] image; ``tokenizer`` as in
    :class:`vlmkern.app.data.synthetic.PairsDataset`."""

    def __init__(self, items: List[_Item], sources_of: List[str], stamps: List[Stamp], gray: Dict[str, np.ndarray],
                 photos: List[Photo], seed: int, image_size: int, background: str, tokenizer=None):
        self.items, self.source = items, sources_of
        self.stamps, self.gray, self.photos = stamps, gray, photos
        self.seed, self.image_size, self.background, self.tokenizer = seed, image_size, background, tokenizer

    def __len__(self):
        return len(self.items)

    def caption(self, i: int) -> str:
        return self.items[i].caption

    def source_row(self, i: int) -> Tuple[str, int]:
        """``(source, row)``: the stamp's position in :func:`scan_stamps`, the digit's row in
        ``load_digits``, the Fashion-MNIST row (test rows after the 60,000 training rows when
        ``split="all"``), or the photograph's position in :data:`PHOTOS`."""
        return self.source[i], self.items[i].row

    @property
    def captions(self) -> List[str]:
        return [it.caption for it in self.items]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for s in self.source:
            out[s] = out.get(s, 0) + 1
        return out

    def render(self, i: int) -> torch.Tensor:
        it = self.items[i]
        if it.kind == "stamp":
            return render_stamp(self.stamps[it.key], self.image_size, self.seed, i, self.background)
        if it.kind in ("digit", "fashion"):
            a = self.gray[it.kind][it.key]
            return _gray_to_rgb(a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a, self.image_size)
        if it.kind == "photo":
            return _photo_crop(self.photos[it.key], it.box, self.image_size)
        raise ValueError(f"unknown item kind {it.kind!r}")

    def __getitem__(self, i):
        img = normalize(self.render(i))
        cap = self.items[i].caption
        return img, (self.tokenizer([cap])[0] if self.tokenizer is not None else cap), i


def _split_rows(n: int, seed: int, val_frac: float, split: str, stream: int) -> List[int]:
    """Rows of one split of ``range(n)``: a seeded permutation, first ``round(val_frac * n)`` are val."""
    perm = _perm(n, _gen(seed, 0, stream))
    n_val = int(round(val_frac * n))
    rows = perm[:n_val] if split == "val" else perm[n_val:] if split == "train" else perm
    return sorted(rows)


def _cap(rows: List[int], limit: Optional[int], seed: int, stream: int) -> List[int]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = _perm(len(rows), _gen(seed, 1, stream))[:limit]
    return sorted(rows[k] for k in keep)


def caption_pairs(sources: Optional[Sequence[str]] = None, split: str = "train", seed: int = 0,
                  image_size: int = 32, per_source: Optional[Union[int, Mapping[str, Optional[int]]]] = 1000,
                  val_frac: float = 0.2, crops_per_photo: int = 24, background: str = "varied", tokenizer=None,
                  tuxpaint_dir: Optional[str] = None, fashion_dir: Optional[str] = None) -> RealPairsDataset:
    """Image-caption pairs from real images.

    * ``tuxpaint-stamps``: each stamp with its English caption ("A frog."),
      composited on a background (:func:`render_stamp`);
    * ``sklearn-digits`` / ``fashion-mnist``: templated captions ("a handwritten
      digit seven.", "a photo of a sneaker.");
    * ``sklearn-photos`` / ``skimage-photos``: random square crops (30-80% of the
      shorter side) captioned with what the photo shows ("a crop of a
      photograph of a cat.").

    ``sources=None`` takes every installed source and skips the others with a
    one-line notice; naming a missing source raises :class:`SourceUnavailable`
    (aliases: ``tuxpaint``, ``digits``, ``fashion``, ``photos``).

    ``split``: "train", "val" or "all". With the same ``seed`` train and val
    never share a stamp or a digit; Fashion-MNIST's val comes from its test
    file; photo crops of both splits come from the same photographs (other
    crops). ``per_source`` caps the pairs each source contributes to this split
    (an int, or a mapping name -> cap; None = no cap): Fashion-MNIST alone
    has 60,000 training images. Items are interleaved in a seeded order; an
    item's index is its position, stable for a given set of arguments."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac}")
    overridden = {"tuxpaint-stamps": tuxpaint_dir is not None, "fashion-mnist": fashion_dir is not None}
    if sources is None:
        names = available()
        names += [n for n, o in overridden.items() if o and n not in names]
    else:
        names = []
        for s in sources:
            for n in (("sklearn-photos", "skimage-photos") if s == "photos" else (_canonical(s),)):
                if not overridden.get(n):  # an explicit folder is checked when it is read
                    require(n)
                if n not in names:
                    names.append(n)
    if not names:
        raise SourceUnavailable("any", "no real-image source is installed", "; ".join(_HOW.values()))
    caps: Dict[str, Optional[int]] = {}
    if isinstance(per_source, Mapping):
        for k, v in per_source.items():
            for n in (("sklearn-photos", "skimage-photos") if k == "photos" else (_canonical(k),)):
                caps[n] = v

    def limit(n: str) -> Optional[int]:
        return caps.get(n) if isinstance(per_source, Mapping) else per_source

    items: List[_Item] = []
    src: List[str] = []
    stamps: List[Stamp] = []
    gray: Dict[str, np.ndarray] = {}
    photos: List[Photo] = []
    g_cap = _gen(seed, 0, 31)

    def tmpl(templates: Sequence[str]) -> str:
        return templates[int(torch.randint(len(templates), (1,), generator=g_cap))]

    for n in names:
        if n == "tuxpaint-stamps":
            all_st = scan_stamps(tuxpaint_dir)
            if not all_st:
                raise SourceUnavailable(n, f"no captioned PNG stamps under {tuxpaint_root(tuxpaint_dir)}", _HOW[n])
            rows = _cap(_split_rows(len(all_st), seed, val_frac, split, 41), limit(n), seed, 41)
            for r in rows:
                items.append(_Item("stamp", len(stamps), all_st[r].caption, r))
                stamps.append(all_st[r])
                src.append(n)
        elif n == "sklearn-digits":
            x, y = load_digits_arrays()
            rows = _cap(_split_rows(len(y), seed, val_frac, split, 42), limit(n), seed, 42)
            gray["digit"] = x[rows]
            for k, r in enumerate(rows):
                items.append(_Item("digit", k, tmpl(DIGIT_TEMPLATES).format(name=DIGIT_CLASSES[y[r]]), r))
                src.append(n)
        elif n == "fashion-mnist":
            parts = {"train": ["train"], "val": ["test"], "all": ["train", "test"]}[split]
            arrs, labs = [], []
            for p in parts:
                x, y = load_fashion_arrays(p, fashion_dir)
                arrs.append(x)
                labs.append(y)
            x, y = np.concatenate(arrs) if len(arrs) > 1 else arrs[0], np.concatenate(labs)
            rows = _cap(list(range(len(y))), limit(n), seed, 43)
            gray["fashion"] = x[rows]
            for k, r in enumerate(rows):
                items.append(_Item("fashion", k, tmpl(FASHION_TEMPLATES).format(
                    a_name=FASHION_PHRASES[y[r]]), r))
                src.append(n)
        else:  # photos
            present = _photos_present(n)
            stream = {"train": 0, "val": 1, "all": 2}[split]
            cands: List[_Item] = []
            for ph in present:
                g = _gen(seed, PHOTOS.index(ph), 50 + stream)
                for _ in range(crops_per_photo):
                    side, x0, y0 = torch.rand(3, generator=g).tolist()
                    box = (x0, y0, 0.3 + 0.5 * side)
                    cands.append(_Item("photo", len(photos), tmpl(PHOTO_TEMPLATES).format(subject=ph.subject),
                                       PHOTOS.index(ph), box))
                photos.append(ph)
            for r in _cap(list(range(len(cands))), limit(n), seed, 44):
                items.append(cands[r])
                src.append(n)
    order = _perm(len(items), _gen(seed, 0, 32))
    return RealPairsDataset([items[k] for k in order], [src[k] for k in order], stamps, gray, photos, seed,
                            image_size, background, tokenizer)
