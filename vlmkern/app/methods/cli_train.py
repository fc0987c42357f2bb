"""``vlmkern train <method>``: one subcommand per trainer; flags (or ``--config file.yaml``) -> a run.

A method's own flags are its config dataclass's scalar fields (:func:`add_config_flags`; ``metadata``
``flag``, ``help`` and ``cli=False`` rename, describe or hide one). A ``--config`` file holds the same
options under the flags' names (``awp_gamma: 1e-3``); flags given override it.

Data: ``--data synthetic`` (the embedded world, no downloads) or ``--data files``: image-text CSV/TSV
(``--train-csv``, ``--val-csv``) or webdataset shards (``--train-shards``) for TuneCLIP; class folders
(``--train-dir``, ``--val-dir``) or labelled CSVs for APFT and Kalman; ``--cir-root`` for WRF4CIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import typing
from typing import Any, Dict, Optional

# method: (config class, data kind, help)
METHODS = {
    "tuneclip": ("TuneCLIPConfig", "pairs", "TuneCLIP: OSR + HGCL fine-tuning on image-text pairs"),
    "apft": ("APFTTrainConfig", "labels", "APFT: adaptive progressive fine-tuning on long-tailed labels"),
    "wrf4cir": ("WRF4CIRConfig", "cir", "WRF4CIR: weight-perturbed composed image retrieval"),
    "kalman": ("KalmanTrainConfig", "labels", "Kalman/LoKO: LoRA + Kalman optimizer, few-shot labels"),
}
_SHARED = (  # (flag, default, argparse keywords)
    ("--model", "vlmkern-tiny-ViT", dict(help="open_clip architecture")),
    ("--pretrained", None, dict(help="open_clip tag or local checkpoint path")),
    ("--data", "synthetic", dict(help="'synthetic' or 'files'")),
    ("--n-train", 512, dict(type=int)), ("--n-val", 128, dict(type=int)),
    ("--image-size", None, dict(type=int, help="input size (default: the model's)")),
    ("--on-error", "skip", dict(choices=("skip", "raise"))),
    ("--device", None, {}),
    ("--out", None, dict(help="run folder (default runs/<method>)")),
    ("--resume", False, dict(action="store_true")),
)
_CSV = (("--train-csv", None, {}), ("--val-csv", None, {}), ("--img-key", "filepath", {}))
_DATA = {
    "pairs": _CSV + (("--caption-key", "title", {}), ("--train-shards", None, dict(nargs="*")),
                     ("--val-shards", None, dict(nargs="*"))),
    "labels": _CSV + (("--label-key", "label", {}), ("--train-dir", None, {}), ("--val-dir", None, {})),
    "cir": (("--cir-root", None, dict(help="FashionIQ/CIRR root (--data files)")),
            ("--cir-layout", "fashioniq", dict(choices=("fashioniq", "cirr")))),
}


def _config_class(method: str):
    return getattr(importlib.import_module(f".{method}", __package__), METHODS[method][0])


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with one of the methods (" + ", ".join(METHODS) + ")")
    methods = p.add_subparsers(dest="method", required=True, metavar="{" + ",".join(METHODS) + "}")
    for method, (_, kind, text) in METHODS.items():
        m = methods.add_parser(method, help=text, description=text)
        m.add_argument("--config", default=None, help="YAML/JSON file of the same options (flags override it)")
        defaults: Dict[str, Any] = {}
        for flag, default, kw in _SHARED + _DATA[kind]:
            _add(m, defaults, flag, default, **kw)
        add_config_flags(m, _config_class(method), defaults)
        m.set_defaults(fn=cmd_train, defaults=defaults)


def _add(p, defaults: Dict[str, Any], flag: str, default, **kw) -> None:
    """``p.add_argument(flag)`` that leaves the option out of the namespace unless given; its default goes
    to ``defaults`` (so a ``--config`` file is overridden only by flags the user gave)."""
    dest = flag[2:].replace("-", "_")
    defaults[dest] = default
    if default is not None and default is not False:
        kw["help"] = f"{kw.get('help') or ''} (default: {default})".strip()
    p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **kw)


def add_config_flags(p, cls, defaults: Dict[str, Any]) -> None:
    """One flag per scalar field of the config dataclass ``cls`` (``Literal``: choices; bool: ``--x/--no-x``;
    a nested config dataclass: its own group; tuples: Python API and ``--config`` only)."""
    group = p.add_argument_group(f"{cls.__name__} options")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            add_config_flags(p, t, defaults)
            continue
        if not f.metadata.get("cli", True):
            continue
        if typing.get_origin(t) is typing.Union:  # Optional[X]
            t = next(a for a in typing.get_args(t) if a is not type(None))
        kw: Dict[str, Any] = {"help": f.metadata.get("help")}
        if typing.get_origin(t) is typing.Literal:
            kw["choices"] = typing.get_args(t)
            t = type(kw["choices"][0])
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif t in (int, float, str):
            kw["type"] = t
        else:  # tuples: Python API and --config file only
            continue
        _add(group, defaults, "--" + f.metadata.get("flag", f.name.replace("_", "-")), f.default, **kw)


def config_from(cls, o: Dict[str, Any]):
    """``cls`` built from the options ``o`` (keyed by flag name, as :func:`add_config_flags` names them)."""
    kw, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t, key = hints[f.name], f.metadata.get("flag", f.name).replace("-", "_")
        if dataclasses.is_dataclass(t):
            kw[f.name] = config_from(t, o)
        elif key in o:
            kw[f.name] = tuple(o[key]) if isinstance(o[key], list) else o[key]
    return cls(**kw)


def _load_config(path: Optional[str]) -> Dict[str, Any]:
    if not path:
        return {}
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


_SUMMARY = {
    "tuneclip": lambda r: {"final": r["final"], "osr_steps": r["osr_steps"]},
    "apft": lambda r: {"strategy": r["strategy"], "best_epoch": r["best_epoch"], "phases_used": r["phases_used"],
                       "val_loss": r["final"]["val_loss"],
                       "t2i_mAP10": {g: m["mAP"].get(10) for g, m in r["final"]["retrieval"]["t2i"].items()}},
    "wrf4cir": lambda r: {"final": r["final"]},
    "kalman": lambda r: {"optimizer": r["optimizer"], "curve": r["curve"]},
}


def cmd_train(args) -> int:
    import torch

    from ..models.clip import create_clip

    method = args.method
    o = {**args.defaults, **_load_config(args.config), **{k: v for k, v in vars(args).items() if k in args.defaults}}
    cfg = config_from(_config_class(method), o)
    device = o["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(o["seed"])
    model, preprocess, tok = create_clip(o["model"], pretrained=o["pretrained"])
    vis = model.visual.image_size
    size = o["image_size"] or (vis[0] if isinstance(vis, (tuple, list)) else vis)
    out = o["out"] or os.path.join("runs", method)
    data = {"pairs": _pairs_data, "labels": _labelled_data, "cir": _cir_data}[METHODS[method][1]](o, size)
    train = getattr(importlib.import_module(f".{method}", __package__), f"train_{method}")
    res = train(model, tok, *data, cfg, out, device=device, resume=o["resume"])
    print(json.dumps({"run": out, **_SUMMARY[method](res)}, indent=1))
    return 0


def _reported(tr, va):
    for name, d in (("train", tr), ("val", va)):
        if d.bad:
            print(f"{name}: {d.report()}")
    return tr, va


def _pairs_data(o, size):
    from ..data import ImageTextCSV, WebDatasetTar, default_transform
    from ..data import synthetic as S

    if o["data"] == "synthetic":
        return S.pairs(o["n_train"], seed=o["seed"] + 1, image_size=size), S.pairs(o["n_val"], seed=o["seed"] + 2,
                                                                                   image_size=size)
    tf = default_transform(size)
    if o.get("train_shards"):
        tr = WebDatasetTar(o["train_shards"], transform=tf, on_error=o["on_error"])
        va = WebDatasetTar(o["val_shards"], transform=tf, on_error=o["on_error"])
    else:
        if not o.get("train_csv") or not o.get("val_csv"):
            raise SystemExit("vlmkern train tuneclip: --data files needs --train-csv/--val-csv or --train-shards/--val-shards")
        kw = dict(img_key=o["img_key"], caption_key=o["caption_key"], transform=tf, on_error=o["on_error"])
        tr, va = ImageTextCSV(o["train_csv"], **kw), ImageTextCSV(o["val_csv"], **kw)
    return _reported(tr, va)


def _labelled_data(o, size):
    from ..data import LabelledImages, default_transform
    from ..data import synthetic as S

    if o["data"] == "synthetic":
        tr, va = S.labelled(o["n_train"], o["n_val"], seed=o["seed"] + 1, image_size=size)
        return tr, va, tr.prompts()
    tf = default_transform(size)
    if o.get("train_dir"):
        tr = LabelledImages(root=o["train_dir"], transform=tf, on_error=o["on_error"])
        va = LabelledImages(root=o["val_dir"], transform=tf, on_error=o["on_error"], classes=tr.classes)
    else:
        kw = dict(img_key=o["img_key"], label_key=o["label_key"], transform=tf, on_error=o["on_error"])
        tr = LabelledImages(csv_path=o["train_csv"], **kw)
        va = LabelledImages(csv_path=o["val_csv"], classes=tr.classes, **kw)
    return (*_reported(tr, va), tr.prompts())


def _cir_data(o, size):
    from ..data import CIRTriplets, default_transform
    from ..data import synthetic as S

    if o["data"] == "synthetic":
        return (S.cir_triplets(o["n_train"], seed=o["seed"] + 1, image_size=size),
                S.cir_triplets(o["n_val"], seed=o["seed"] + 2, image_size=size))
    if not o.get("cir_root"):
        raise SystemExit("vlmkern train wrf4cir: --data files needs --cir-root")
    tf = default_transform(size)
    tr = CIRTriplets(o["cir_root"], split="train", layout=o["cir_layout"], transform=tf, on_error=o["on_error"])
    va = CIRTriplets(o["cir_root"], split="val", layout=o["cir_layout"], transform=tf, on_error=o["on_error"])
    return _reported(tr, va)
