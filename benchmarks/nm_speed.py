"""SR-STE N:M training overhead, measured side by side with dense training in one run.

    PYTHONPATH=. python benchmarks/nm_speed.py                 # CPU (2 threads by default)
    PYTHONPATH=. python benchmarks/nm_speed.py --device cuda --threads 0

Prints, for each case, the median train-step time of SR-STE 2:4 (NMSparsity attached) divided by the
median dense step time, dense and sparse repetitions interleaved; and the time of one full 2:4 mask pass
(``nm_mask``) over every eligible timm resnet50 Conv2d/Linear weight, next to a ``topk`` + ``scatter``
baseline and one ``abs`` pass over the same weights (a memory-bandwidth floor).

Cases: timm resnet50, 224 px, batch 32 (goal ratio <= 1.03); timm resnet18, 1 x 32 x 32 digits-sized
input, batch 64 (goal <= 1.15); mask pass goal <= 50 ms on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.callbacks.nm import NMSparsity
from lightning_sparse.sparsity.nm import is_nm_eligible, nm_mask


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, nm: NMSparsity | None = None):
    """One SGD step; with ``nm``, what the callback does in a Trainer step: the Parameters hold W ⊙ M(W) for
    forward and backward, then the dense W comes back and SR-STE's decay term is added before the step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if nm is None:
            F.cross_entropy(model(x), y).backward()
        else:
            with nm.masked(model):
                F.cross_entropy(model(x), y).backward()
            nm.engine.add_decay(2e-4)
        opt.step()

    return step


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def step_ratio(name: str, in_chans: int, size: int, batch: int, reps: int, device: str) -> float:
    torch.manual_seed(0)
    dense = timm.create_model(name, num_classes=1000 if size > 64 else 10, in_chans=in_chans).to(device)
    sparse = copy.deepcopy(dense)
    nm = NMSparsity(n=2, m=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nm.attach(sparse)
    x = torch.randn(batch, in_chans, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {"dense": _step_fn(dense, x, y), "srste": _step_fn(sparse, x, y, nm)}
    for fn in steps.values():  # warm-up
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            times[k].append(_timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["srste"] / med["dense"]
    print(
        f"{name:9s} {in_chans}x{size}x{size} batch {batch:3d}: dense {med['dense'] * 1e3:8.1f} ms  "
        f"SR-STE 2:4 {med['srste'] * 1e3:8.1f} ms  ratio {ratio:.3f}  "
        f"(coverage {nm.coverage:.3f}, {len(nm.targets)} layers, {reps} interleaved reps)"
    )
    return ratio


def mask_pass(reps: int, device: str) -> dict[str, float]:
    model = timm.create_model("resnet50").to(device)
    weights = [
        mod.weight.detach()
        for mod in model.modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and is_nm_eligible(mod.weight, 4)
    ]

    def topk_scatter() -> None:  # the naive reference: per-group topk + scatter
        for w in weights:
            g = w.permute(0, 2, 3, 1).reshape(-1, 4) if w.ndim == 4 else w.reshape(-1, 4)
            idx = g.abs().topk(2, dim=1).indices
            torch.zeros(g.shape, dtype=torch.bool, device=device).scatter_(1, idx, True)

    fns = {
        "nm_mask": lambda: [nm_mask(w, 2, 4) for w in weights],
        "topk+scatter": topk_scatter,
        "abs (floor)": lambda: [w.abs() for w in weights],
    }
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    numel = sum(w.numel() for w in weights)
    print(
        f"2:4 mask pass over resnet50 ({len(weights)} weights, {numel / 1e6:.1f} M params): "
        + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items())
        + f"  -> nm_mask is {med['topk+scatter'] / med['nm_mask']:.1f}x faster than topk+scatter"
    )
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--reps50", type=int, default=5, help="interleaved repetitions, resnet50 steps")
    p.add_argument("--reps18", type=int, default=15, help="interleaved repetitions, resnet18 steps")
    p.add_argument("--mask-reps", type=int, default=15)
    p.add_argument("--skip-resnet50-step", action="store_true", help="skip the (slow on CPU) resnet50 step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    med = mask_pass(args.mask_reps, args.device)
    r18 = step_ratio("resnet18", 1, 32, 64, args.reps18, args.device)
    r50 = None if args.skip_resnet50_step else step_ratio("resnet50", 3, 224, 32, args.reps50, args.device)
    print("goals: mask pass <= 50 ms: "
          f"{'met' if med['nm_mask'] <= 0.05 else 'MISSED'} ({med['nm_mask'] * 1e3:.1f} ms); "
          f"resnet18 32px ratio <= 1.15: {'met' if r18 <= 1.15 else 'MISSED'} ({r18:.3f}); "
          + ("resnet50 skipped" if r50 is None else
             f"resnet50 ratio <= 1.03: {'met' if r50 <= 1.03 else 'MISSED'} ({r50:.3f})"))


if __name__ == "__main__":
    main()
