"""Give every sample of a webdataset a stable integer index (for vlmkern's per-sample ``u`` state).

    python -m vlmkern.integrations.wds_index 'shards/{000000..000003}.tar' --out indexed/

open_clip's webdataset pipeline shuffles shards and samples, splits them over ranks and
DataLoader workers, and with ``--dataset-resampled`` draws shards with replacement: a
sample's position in the stream says nothing about which sample it is, and its ``__key__``
is a string (hashing it into ``[0, N)`` would silently merge samples). So the index is
*data*: this tool rewrites each shard with one more member per sample, ``<key>.idx``, the
sample's global index as ASCII decimal, and the index travels inside the sample through
every shuffle, split and resampling (:mod:`vlmkern.integrations.open_clip_train` puts it
into the batch next to the image and the caption).

Indices are ``0 .. N-1`` in the order of the shards as given (braces expanded, ``::``
separates lists) and of the samples inside each shard. A *sample* is what webdataset
groups: consecutive members with the same key (the member name up to the first dot of its
base name, webdataset's ``base_plus_ext``); every sample gets an index, also one that
open_clip would later drop (no image or no caption): its ``u`` entry is then never visited.

Written into ``--out`` (which may be the shards' own directory: each shard is written to a
temporary file, then renamed over the old one):

- the shards, same base names (gzip-compressed when the name ends in ``.gz``/``.tgz``), every
  file member as it was plus ``<key>.idx`` after each sample;
- ``vlmkern_index.json``: ``{"format": 1, "field": "idx", "num_samples": N, "dataset_id": ...,
  "shards": {"<base name>": {"first": i0, "count": n}, ...}}``: the launcher reads ``N`` (the
  size of the ``u`` state) from it before training, and checks that every training shard is
  listed (``dataset_id`` tells index files of different runs of this tool apart);
- ``sizes.json`` (the LAION convention ``{"<base name>": n}``): open_clip reads it for the
  epoch length when ``--train-num-samples`` is not given.

Shards that already hold ``.idx`` members are refused before anything is written (indexing
twice would renumber them).
Shards written by another tool can carry the field too (``<key>.idx``, decimal ``0 <= i < N``,
unique per sample); without this tool's ``vlmkern_index.json`` the launcher then needs
``--vlmkern-num-samples N``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import uuid
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

FIELD = "idx"
INDEX_FILE = "vlmkern_index.json"
SIZES_FILE = "sizes.json"
FORMAT = 1

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def split_key(name: str) -> Tuple[str, str]:
    """``(key, extension)`` of a tar member name, as webdataset's ``base_plus_ext`` splits it
    (``("", "")`` for a name without an extension, which webdataset skips)."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else ("", "")


def expand_shards(spec: str | Sequence[str]) -> List[str]:
    """The shard list of ``spec``: ``::``-separated lists, each brace-expanded (open_clip's rule)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    try:
        import braceexpand
    except ImportError as exc:  # pragma: no cover - a dependency of open_clip_train
        raise ImportError(f"braceexpand is needed to expand shard lists ({exc}): pip install braceexpand") from exc
    out: List[str] = []
    for s in specs:
        for part in s.split("::"):
            out.extend(braceexpand.braceexpand(part))
    return out


def _keyed_files(tar: tarfile.TarFile) -> Iterator[Tuple[tarfile.TarInfo, str, str]]:
    """``(member, key, extension)`` of the shard's regular files that webdataset reads (those
    with a key), in tar order."""
    for info in tar:
        if info.isfile():
            k, ext = split_key(info.name)
            if k:
                yield info, k, ext


def _samples(tar: tarfile.TarFile, shard: str) -> Iterator[Tuple[str, List[Tuple[tarfile.TarInfo, bytes]]]]:
    """The samples of a shard in order: ``(key, [(member, data), ...])``, grouped as webdataset
    groups them (a new sample when the key changes or an extension repeats)."""
    key, members, exts = None, [], set()
    for info, k, ext in _keyed_files(tar):
        if ext.lower() == FIELD:
            raise ValueError(f"{shard}: member {info.name} is already a '.{FIELD}' field: the shards are indexed "
                             "(indexing again would renumber them)")
        data = tar.extractfile(info).read()
        if key is not None and (k != key or ext.lower() in exts):
            yield key, members
            members, exts = [], set()
        key = k
        members.append((info, data))
        exts.add(ext.lower())
    if key is not None:
        yield key, members


def _first_sample_indexed(shard: str) -> bool:
    """Whether the shard's first sample already has a ``.idx`` member (this tool indexes a shard
    whole or not at all, so that tells an indexed shard; read up to the first sample's end only)."""
    with tarfile.open(shard, "r|*") as tar:
        key = None
        for _, k, ext in _keyed_files(tar):
            if key is not None and k != key:
                return False
            key = k
            if ext.lower() == FIELD:
                return True
    return False


def index_shards(shards: Iterable[str], out_dir: str) -> Dict:
    """Rewrite ``shards`` into ``out_dir`` with a ``<key>.idx`` member per sample (global indices
    ``0 .. N-1`` in shard and sample order); writes ``vlmkern_index.json`` and ``sizes.json`` there
    and returns the index file's content."""
    shards = list(shards)
    if not shards:
        raise ValueError("no shards given")
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"shards with the same base name {dup} would overwrite each other in {out_dir}")
    for s in shards:
        if not os.path.isfile(s):
            raise FileNotFoundError(f"shard {s} is not a local file")
    done = [s for s in shards if _first_sample_indexed(s)]
    if done:  # checked before anything is written: an in-place run that stops half way would be worse
        raise ValueError(f"{len(done)} shard(s) already hold a '.{FIELD}' field ({', '.join(done[:3])}"
                         f"{', ...' if len(done) > 3 else ''}): the shards are indexed (indexing again would "
                         "renumber them)")
    os.makedirs(out_dir, exist_ok=True)
    table: Dict[str, Dict[str, int]] = {}
    first = 0
    for shard, name in zip(shards, names):
        target = os.path.join(out_dir, name)
        tmp = os.path.join(out_dir, f".{name}.vlmkern-tmp")
        count = 0
        try:
            mode = "w:gz" if name.endswith((".gz", ".tgz")) else "w"  # the compression the name says
            with tarfile.open(shard, "r|*") as src, tarfile.open(tmp, mode) as dst:
                for key, members in _samples(src, shard):
                    for info, data in members:
                        dst.addfile(info, io.BytesIO(data))
                    payload = str(first + count).encode("ascii")
                    info = tarfile.TarInfo(f"{key}.{FIELD}")
                    info.size, info.mtime, info.mode = len(payload), members[-1][0].mtime, 0o644
                    dst.addfile(info, io.BytesIO(payload))
                    count += 1
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        table[name] = {"first": first, "count": count}
        first += count
    index = {"format": FORMAT, "field": FIELD, "num_samples": first, "dataset_id": uuid.uuid4().hex,
             "shards": table}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(out_dir, SIZES_FILE), "w") as f:
        json.dump({name: v["count"] for name, v in table.items()}, f, indent=1)
    return index


def read_index(shards: Sequence[str]) -> Dict:
    """The one ``vlmkern_index.json`` that covers every shard of ``shards`` (looked up in each
    shard's directory). Raises ``ValueError`` saying what is missing."""
    found: Dict[str, Dict] = {}
    index = None
    for shard in shards:
        d = os.path.dirname(shard)
        path = os.path.join(d, INDEX_FILE)
        if path not in found:
            if "://" in shard or shard.startswith("pipe:") or not os.path.isfile(path):
                raise ValueError(f"no {INDEX_FILE} next to the shard {shard} (it is written by "
                                 f"python -m vlmkern.integrations.wds_index)")
            with open(path) as f:
                found[path] = json.load(f)
            got = found[path]
            if got.get("format") != FORMAT or not isinstance(got.get("num_samples"), int):
                raise ValueError(f"{path} is not a vlmkern index file of format {FORMAT}")
            if index is not None and got.get("dataset_id") != index.get("dataset_id"):
                raise ValueError(f"the shards' directories hold different index files ({sorted(found)}): their "
                                 "indices overlap; index all the shards in one run of wds_index")
            index = got
        if os.path.basename(shard) not in found[path]["shards"]:
            raise ValueError(f"the shard {shard} is not listed in {path}: it was not indexed with the others")
    if index is None:
        raise ValueError("no shards given")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmkern.integrations.wds_index",
                                description="Add a stable per-sample index (<key>.idx) to webdataset shards, for "
                                            "vlmkern's per-sample loss state in open_clip's trainer.")
    p.add_argument("shards", nargs="+", help="shard files; brace patterns ('shards/{000000..000099}.tar') and "
                                             "'::'-separated lists are expanded")
    p.add_argument("--out", required=True, help="output directory (may be the shards' own: rewritten in place)")
    a = p.parse_args(argv)
    try:
        index = index_shards(expand_shards(a.shards), a.out)
    except (ValueError, FileNotFoundError, tarfile.TarError) as exc:
        p.error(str(exc))
    print(f"indexed {index['num_samples']} samples in {len(index['shards'])} shards into {a.out} "
          f"({INDEX_FILE}, {SIZES_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
