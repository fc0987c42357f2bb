"""``vlmkern eval``: evaluate a model or a trainer checkpoint.

    vlmkern eval --model vlmkern-tiny-ViT --checkpoint runs/apft/checkpoint.pt --task labels
    vlmkern eval --model ViT-B-32 --pretrained openai --task pairs --data files --val-csv val.csv

``--checkpoint`` takes a run folder's ``checkpoint.pt`` of any trainer (TuneCLIP,
APFT, WRF4CIR, Kalman/LoRA: LoRA settings are read from the run's config.json)
or a plain state dict. Tasks: ``pairs`` (caption R@1/5/10), ``labels``
(zero-shot accuracy and APFT's grouped retrieval), ``cir`` (Recall@K).
"""

from __future__ import annotations

import json
import os


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model / checkpoint (pairs, labels, cir)")
    p.add_argument("--model", default="vlmkern-tiny-ViT")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--checkpoint", default=None, help="trainer checkpoint.pt or a state dict")
    p.add_argument("--task", required=True, choices=("pairs", "labels", "cir"))
    p.add_argument("--data", default="synthetic")
    p.add_argument("--val-csv"), p.add_argument("--val-dir"), p.add_argument("--val-shards", nargs="*")
    p.add_argument("--cir-root"), p.add_argument("--cir-layout", default="fashioniq", choices=("fashioniq", "cirr"))
    p.add_argument("--img-key", default="filepath"), p.add_argument("--caption-key", default="title")
    p.add_argument("--label-key", default="label")
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(fn=cmd_eval)


def load_trained(model, checkpoint: str) -> str:
    """Load a trainer checkpoint into an open_clip ``model``; returns the kind found."""
    import torch

    st = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd = st.get("model", st) if isinstance(st, dict) else st
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    kind = "clip"
    if any(k.startswith("clip.") for k in sd):  # WRF4CIR's CIRModel (combiner weights dropped)
        sd = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
        kind = "cir"
    if any("lora" in k.lower() or "parametrizations" in k for k in sd):
        from ..models.lora import add_lora

        cfg_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        add_lora(model, rank=cfg.get("lora_rank", 8), alpha=cfg.get("lora_alpha", 16.0))
        kind = "lora"
    model.load_state_dict(sd)
    return kind


def cmd_eval(args) -> int:
    import torch

    from ..models.clip import create_clip
    from .cli_train import _cir_data, _labelled_data, _pairs_data

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _, tok = create_clip(args.model, pretrained=args.pretrained)
    kind = load_trained(model, args.checkpoint) if args.checkpoint else "pretrained"
    model.to(device).eval()
    vis = model.visual.image_size
    size = vis[0] if isinstance(vis, (tuple, list)) else vis
    o = dict(vars(args), n_train=512, train_csv=args.val_csv, train_dir=args.val_dir, train_shards=args.val_shards,
             on_error="skip")
    out = {"model": args.model, "checkpoint": args.checkpoint, "loaded": kind, "task": args.task}
    if args.task == "pairs":
        from .tuneclip import evaluate_pairs

        _, va = _pairs_data(o, size)
        out["metrics"] = evaluate_pairs(model, tok, va, device)
    elif args.task == "labels":
        from ..eval.metrics import frequency_groups
        from .apft import evaluate

        tr, va, prompts = _labelled_data(o, size)
        groups = frequency_groups(tr.labels, num_classes=len(prompts))
        ev = evaluate(model, tok, va, prompts, groups, device)
        out["metrics"] = {"val_loss": ev["val_loss"], "zero_shot_top1": ev["retrieval"]["i2t"]["all"]["hit"][1],
                          "t2i_mAP10": {g: m["mAP"][10] for g, m in ev["retrieval"]["t2i"].items()},
                          "i2t_R10": {g: m["recall"][10] for g, m in ev["retrieval"]["i2t"].items()}}
    else:
        from ..models.cir import SumCombiner
        from .wrf4cir import CIRModel, evaluate_cir

        _, va = _cir_data(o, size)
        out["metrics"] = {f"R{k}": v for k, v in evaluate_cir(CIRModel(model, SumCombiner()), tok, va, device).items()}
    print(json.dumps(out, indent=1, default=str))
    return 0
