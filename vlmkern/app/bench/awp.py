"""AWP weight perturbation (SPEC §4): fused vlmkern ops vs torch._foreach vs a per-tensor loop,
and the wall-clock overhead of a full WeightPerturbation training step.

    python -m vlmkern.app.bench.awp [--quick | --targets] [--device cpu|cuda] [--out bench/out]
    python -m vlmkern.app.bench.awp --step [--quick]        # training-step overhead on a small CLIP

Bench ``awp`` (harness): cases are parameter lists
  * ``vitb16``: the tensors AWP perturbs in ViT-B/16 CLIP, both towers (dim > 1:
    102 tensors, 149.4M elements; shapes from open_clip on the meta device);
  * ``synthetic``: 1024 tensors, sizes log-uniform in [256, 262144] elements.
Modes: ``perturb`` (norms + save + perturb: reads w, g twice, writes backup, w:
6 N element-bytes), ``restore`` (reads backup, writes w: 2 N), ``cycle`` (both: 8 N),
``random`` (random-direction perturb: norms read w, perturb reads w, writes backup,
w: 4 N; the Gaussian is generated twice and never stored).
Providers: ``loop`` (baseline: per-tensor torch ops; in ``random`` mode torch.randn
per tensor), ``foreach`` (torch._foreach_norm, _foreach_copy_, _foreach_mul/_add_;
not in ``random`` mode), ``vlmkern`` (auto backend), ``vlmkern-torch`` (the
library's PyTorch fallback; in ``random`` mode only on lists up to 50M elements:
its generator costs ~90 ns per element on CPU).

Bench ``awp_step``: plain AdamW step vs WeightPerturbation (adversarial, random) on
a small open_clip CLIP; ``two-plain`` = two plain forward/backward + one step, the
floor of an adversarial step.
"""

from __future__ import annotations

import math
import sys

import torch

import vlmkern
from vlmkern.app.bench.harness import Bench, Provider, main

GAMMA = 1e-3
EPS = 1e-12


def vitb16_shapes(perturbed_only: bool = True):
    import open_clip

    with torch.device("meta"):
        m = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    return [tuple(p.shape) for _, p in m.named_parameters() if (len(p.shape) > 1 or not perturbed_only)]


def synthetic_shapes(n: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(n, generator=g) * (math.log(262144) - math.log(256)) + math.log(256)
    return [(int(math.exp(x)),) for x in logs.tolist()]


_SHAPES = {}


def shapes_of(case):
    name = case["list"]
    key = (name, case.get("n", 1024)) if name == "synthetic" else name
    if key not in _SHAPES:
        if name == "vitb16":
            _SHAPES[key] = vitb16_shapes()
        elif name == "vitb16-small":  # quick mode: the same structure, widths / 4
            _SHAPES[key] = [tuple(max(1, s // 4) for s in sh) for sh in vitb16_shapes()]
        else:  # synthetic lists of different lengths must not share one cache entry
            _SHAPES[key] = synthetic_shapes(case.get("n", 1024))
    return _SHAPES[key]


def numel_of(case) -> int:
    return sum(math.prod(s) for s in shapes_of(case))


_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(case, device):
    dt = _DT[case["dtype"]]
    ws = [torch.randn(s, device=device, dtype=torch.float32).to(dt) for s in shapes_of(case)]
    gs = [torch.randn_like(w) for w in ws]
    bs = [torch.empty_like(w) for w in ws]
    return ws, gs, bs


def loop_perturb(ws, gs, bs):
    for w, g, b in zip(ws, gs, bs):
        s = GAMMA * torch.linalg.vector_norm(w, dtype=torch.float32) / (torch.linalg.vector_norm(g, dtype=torch.float32) + EPS)
        b.copy_(w)
        w.add_((g * s).to(w.dtype))


def loop_random(ws, bs, gen):
    for w, b in zip(ws, bs):
        r = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        s = GAMMA * torch.linalg.vector_norm(w, dtype=torch.float32) / (torch.linalg.vector_norm(r) + EPS)
        b.copy_(w)
        w.add_((r * s).to(w.dtype))


def loop_restore(ws, bs):
    for w, b in zip(ws, bs):
        w.copy_(b)


def foreach_perturb(ws, gs, bs):
    nw = torch._foreach_norm(ws, 2, dtype=torch.float32)
    ng = torch._foreach_norm(gs, 2, dtype=torch.float32)
    scales = torch._foreach_div(torch._foreach_mul(nw, GAMMA), torch._foreach_add(ng, EPS))
    torch._foreach_copy_(bs, ws)
    # _foreach_mul(list, list) of 0-d tensors broadcasts per tensor
    torch._foreach_add_(ws, [(g * s).to(g.dtype) for g, s in zip(gs, scales)])


def foreach_restore(ws, bs):
    torch._foreach_copy_(ws, bs)


def make_provider(kind):
    def make(case, mode, device):
        ws, gs, bs = build(case, device)
        if mode == "random":
            if kind == "loop":
                gen = torch.Generator(device=device).manual_seed(0)
                return torch.no_grad()(lambda: loop_random(ws, bs, gen))
            be = None if kind == "vlmkern" else "torch"
            seed = iter(range(1 << 62))
            return torch.no_grad()(lambda: vlmkern.awp_perturb_(ws, None, bs, gamma=GAMMA, mode="random",
                                                                seed=next(seed), backend=be))
        if kind == "loop":
            pert, rest = (lambda: loop_perturb(ws, gs, bs)), (lambda: loop_restore(ws, bs))
        elif kind == "foreach":
            pert, rest = (lambda: foreach_perturb(ws, gs, bs)), (lambda: foreach_restore(ws, bs))
        else:
            be = None if kind == "vlmkern" else "torch"
            pert = lambda: vlmkern.awp_perturb_(ws, gs, bs, gamma=GAMMA, backend=be)  # noqa: E731
            rest = lambda: vlmkern.awp_restore_(ws, bs, backend=be)  # noqa: E731
        with torch.no_grad():
            pert()  # backup holds real weights before timing restore
        if mode == "perturb":
            return torch.no_grad()(pert)
        if mode == "restore":
            return torch.no_grad()(rest)

        @torch.no_grad()
        def cycle():
            pert()
            rest()

        return cycle

    return make


def bytes_moved(case, mode):
    nb = numel_of(case) * torch.tensor([], dtype=_DT[case["dtype"]]).element_size()
    return {"perturb": 6 * nb, "restore": 2 * nb, "cycle": 8 * nb, "random": 4 * nb}[mode]


def _fallback_skip(case, mode, device):
    if mode == "random" and device.type == "cpu" and numel_of(case) > 50_000_000:
        return "fallback generator ~90 ns/element on CPU: random mode timed on lists up to 50M elements only"
    return None


def make_bench(quick: bool, targets: bool = False) -> Bench:
    """AWP perturb / restore over CLIP ViT-B/16 and a synthetic list."""
    if quick and not targets:
        cases = [{"list": "vitb16-small", "dtype": "float32"}, {"list": "synthetic", "n": 256, "dtype": "bfloat16"}]
    else:
        cases = [
            {"list": "vitb16", "dtype": "float32"},
            {"list": "vitb16", "dtype": "bfloat16"},
            {"list": "vitb16", "dtype": "float16"},
            {"list": "synthetic", "n": 1024, "dtype": "float32"},
            {"list": "synthetic", "n": 1024, "dtype": "bfloat16"},
        ]
    providers = [
        Provider("loop", make_provider("loop"), kind="baseline"),
        Provider("foreach", make_provider("foreach"), kind="peer", modes=("perturb", "restore", "cycle")),
        Provider("vlmkern", make_provider("vlmkern"), kind="vlmkern"),
        Provider("vlmkern-torch", make_provider("vlmkern-torch"), kind="vlmkern", skip=_fallback_skip),
    ]
    return Bench(
        name="awp",
        cases=cases,
        providers=providers,
        baseline="loop",
        modes=("perturb", "restore", "cycle", "random"),
        bytes_moved=bytes_moved,
        dtype_of=lambda case: _DT[case["dtype"]],
        count_launches=True,
        time_budget_s=20.0 if targets else None,
        notes=(
            "Bytes counted per SPEC §4: perturb = norms (read w, g) + perturb (read w, g; write backup, w) = 6N element-bytes; "
            "restore = 2N; cycle = 8N; random = norms (read w) + perturb (read w; write backup, w) = 4N.  "
            "`% of floor` = those bytes at the measured copy bandwidth / median time."
        ),
    )


# ---------------------------------------------------------------------------
# training-step overhead on a small CLIP
# ---------------------------------------------------------------------------


def small_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return CLIP(
        embed_dim=256,
        vision_cfg=CLIPVisionCfg(layers=4, width=256, head_width=64, patch_size=16, image_size=128),
        text_cfg=CLIPTextCfg(context_length=32, vocab_size=4096, width=256, heads=4, layers=4),
    )


def make_step_provider(kind):
    def make(case, mode, device):
        from vlmkern.optim import WeightPerturbation

        model = small_clip().to(device)
        b = case["batch"]
        g = torch.Generator().manual_seed(0)
        img = torch.randn(b, 3, 128, 128, generator=g).to(device)
        txt = torch.randint(0, 4096, (b, 32), generator=g).to(device)
        labels = torch.arange(b, device=device)
        base = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def closure():
            fi, ft, scale = model(img, txt)[:3]
            logits = scale * fi @ ft.t()
            loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
            loss.backward()
            return loss

        if kind == "plain":
            def step():
                base.zero_grad(set_to_none=True)
                closure()
                base.step()
            return step
        if kind == "two-plain":
            def step():
                base.zero_grad(set_to_none=True)
                closure()
                base.zero_grad(set_to_none=True)
                closure()
                base.step()
            return step
        wp = WeightPerturbation(model, base, gamma=GAMMA, random_ratio=1.0 if kind == "wp-random" else 0.0)
        return lambda: wp.step(closure)

    return make


def make_step_bench(quick: bool, targets: bool = False) -> Bench:
    """Wall-clock of a WeightPerturbation step vs a plain step on a small CLIP."""
    return Bench(
        name="awp_step",
        cases=[{"model": "clip-4L-256w", "batch": 8 if quick else 16}],
        providers=[
            Provider("plain", make_step_provider("plain"), kind="baseline"),
            Provider("two-plain", make_step_provider("two-plain"), kind="reference"),
            Provider("wp-adversarial", make_step_provider("wp-adversarial"), kind="vlmkern"),
            Provider("wp-random", make_step_provider("wp-random"), kind="vlmkern"),
        ],
        baseline="plain",
        modes=("full",),
        notes=(
            "Small open_clip CLIP (vision: 4 layers, width 256, 128px/16; text: 4 layers, width 256, 32 tokens), AdamW. "
            "`two-plain` (two forward/backward + one step) is the floor of an adversarial step; "
            "`vs baseline` < 1 means slower than the plain step."
        ),
    )


if __name__ == "__main__":
    if "--step" in sys.argv:
        sys.argv.remove("--step")
        main(make_step_bench)
    else:
        main(make_bench)
