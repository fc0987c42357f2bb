"""``vlmkern train <method>``: flags (or ``--config file.yaml``) -> a trainer run.

Data: ``--data synthetic`` (the embedded world, no downloads) or real files:
image-text CSV/TSV (``--train-csv``, ``--val-csv``, ``--img-key``, ``--caption-key``)
or webdataset shards (``--train-shards``) for TuneCLIP; class folders
(``--train-dir``, ``--val-dir``) or labelled CSVs for APFT.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

METHODS = ("tuneclip", "apft", "wrf4cir", "kalman")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with one of the methods (" + ", ".join(METHODS) + ")")
    p.add_argument("method", choices=METHODS)
    p.add_argument("--config", default=None, help="YAML/JSON file of the same options (flags override it)")
    p.add_argument("--model", default="vlmkern-tiny-ViT", help="open_clip architecture")
    p.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint path")
    p.add_argument("--data", default="synthetic", help="'synthetic' or 'files'")
    p.add_argument("--train-csv"), p.add_argument("--val-csv")
    p.add_argument("--train-shards", nargs="*"), p.add_argument("--val-shards", nargs="*")
    p.add_argument("--train-dir"), p.add_argument("--val-dir")
    p.add_argument("--img-key", default="filepath"), p.add_argument("--caption-key", default="title")
    p.add_argument("--label-key", default="label")
    p.add_argument("--on-error", default="skip", choices=("skip", "raise"))
    p.add_argument("--n-train", type=int, default=512), p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None), p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None), p.add_argument("--wd", type=float, default=None)
    p.add_argument("--amp", default=None, choices=(None, "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="run folder (default runs/<method>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events (if installed)")
    p.add_argument("--grad-accum", type=int, default=None, help="APFT: micro-batches per optimizer step")
    # TuneCLIP
    p.add_argument("--loss", default=None, choices=("hgcl", "gcl", "clip"))
    p.add_argument("--osr-epochs", type=int, default=None)
    p.add_argument("--margin", type=float, default=None), p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--tau", type=float, default=None)
    # APFT
    p.add_argument("--strategy", default=None, choices=("apft", "fixed", "full", "lora"))
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    # WRF4CIR
    p.add_argument("--awp-gamma", type=float, default=None, help="perturbation size (0 = plain fine-tuning)")
    p.add_argument("--random-ratio", type=float, default=None)
    p.add_argument("--warmup-epochs", type=int, default=None)
    p.add_argument("--combiner", default=None, choices=("sum", "learned"))
    p.add_argument("--cir-root", default=None, help="FashionIQ/CIRR root (--data files)")
    p.add_argument("--cir-layout", default="fashioniq", choices=("fashioniq", "cirr"))
    # Kalman
    p.add_argument("--optimizer", default=None, choices=("kalman", "adamw"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--p0", type=float, default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.set_defaults(fn=cmd_train)


def _load_config(path: Optional[str]) -> Dict[str, Any]:
    if not path:
        return {}
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _merge(args) -> Dict[str, Any]:
    cfg = _load_config(args.config)
    for k, v in vars(args).items():
        if k in ("fn", "command", "config"):
            continue
        if v is not None or k not in cfg:
            if v is not None:
                cfg[k] = v
            else:
                cfg.setdefault(k, v)
    return cfg


def cmd_train(args) -> int:
    import torch

    from ..models.clip import create_clip

    o = _merge(args)
    device = o.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(o["seed"])
    model, preprocess, tok = create_clip(o["model"], pretrained=o.get("pretrained"))
    vis = model.visual.image_size
    size = o.get("image_size") or (vis[0] if isinstance(vis, (tuple, list)) else vis)
    out = o.get("out") or os.path.join("runs", o["method"])
    if o["method"] == "tuneclip":
        from .tuneclip import TuneCLIPConfig, train_tuneclip

        tr, va = _pairs_data(o, size)
        cfg = TuneCLIPConfig(**{k: v for k, v in dict(
            loss=o.get("loss"), osr_epochs=o.get("osr_epochs"), epochs=o.get("epochs"),
            batch_size=o.get("batch_size"), lr=o.get("lr"), wd=o.get("wd"), margin=o.get("margin"),
            gamma=o.get("gamma"), tau=o.get("tau"), amp=o.get("amp"), seed=o["seed"], tensorboard=o.get("tensorboard") or None).items() if v is not None})
        res = train_tuneclip(model, tok, tr, va, cfg, out, device=device, resume=o.get("resume", False))
        print(json.dumps({"run": out, "final": res["final"], "osr_steps": res["osr_steps"]}, indent=1))
        return 0
    if o["method"] == "wrf4cir":
        from .wrf4cir import WRF4CIRConfig, train_wrf4cir

        tr, va = _cir_data(o, size)
        cfg = WRF4CIRConfig(**{k: v for k, v in dict(
            epochs=o.get("epochs"), batch_size=o.get("batch_size"), lr=o.get("lr"), wd=o.get("wd"),
            gamma=o.get("awp_gamma"), random_ratio=o.get("random_ratio"), warmup_epochs=o.get("warmup_epochs"),
            combiner=o.get("combiner"), amp=o.get("amp"), seed=o["seed"], tensorboard=o.get("tensorboard") or None).items() if v is not None})
        res = train_wrf4cir(model, tok, tr, va, cfg, out, device=device, resume=o.get("resume", False))
        print(json.dumps({"run": out, "final": res["final"]}, indent=1))
        return 0
    if o["method"] == "kalman":
        from .kalman import KalmanTrainConfig, train_kalman

        tr, va, prompts = _labelled_data(o, size)
        cfg = KalmanTrainConfig(**{k: v for k, v in dict(
            optimizer=o.get("optimizer"), steps=o.get("steps"), batch_size=o.get("batch_size"), lr=o.get("lr"),
            p0=o.get("p0"), lora_rank=o.get("lora_rank"), amp=o.get("amp"), seed=o["seed"], tensorboard=o.get("tensorboard") or None).items() if v is not None})
        res = train_kalman(model, tok, tr, va, prompts, cfg, out, device=device, resume=o.get("resume", False))
        print(json.dumps({"run": out, "optimizer": res["optimizer"], "curve": res["curve"]}, indent=1))
        return 0
    from .apft import APFTTrainConfig, train_apft
    from .apft_schedule import APFTConfig

    tr, va, prompts = _labelled_data(o, size)
    sched = APFTConfig(**{k: v for k, v in dict(window=o.get("window"), patience=o.get("patience")).items()
                          if v is not None})
    cfg = APFTTrainConfig(**{k: v for k, v in dict(
        strategy=o.get("strategy"), max_epochs=o.get("epochs"), batch_size=o.get("batch_size"), lr=o.get("lr"),
        wd=o.get("wd"), amp=o.get("amp"), seed=o["seed"], schedule=sched, grad_accum=o.get("grad_accum"),
        tensorboard=o.get("tensorboard") or None).items() if v is not None})
    res = train_apft(model, tok, tr, va, prompts, cfg, out, device=device, resume=o.get("resume", False))
    summary = {"run": out, "strategy": res["strategy"], "best_epoch": res["best_epoch"],
               "phases_used": res["phases_used"], "val_loss": res["final"]["val_loss"],
               "t2i_mAP10": {g: m["mAP"].get(10) for g, m in res["final"]["retrieval"]["t2i"].items()}}
    print(json.dumps(summary, indent=1))
    return 0


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
    for name, d in (("train", tr), ("val", va)):
        if d.bad:
            print(f"{name}: {d.report()}")
    return tr, va


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
    for name, d in (("train", tr), ("val", va)):
        if d.bad:
            print(f"{name}: {d.report()}")
    return tr, va, tr.prompts()


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
    for name, d in (("train", tr), ("val", va)):
        if d.bad:
            print(f"{name}: {d.report()}")
    return tr, va
