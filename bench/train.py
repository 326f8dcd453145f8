"""Benchmark of the training loop: what adversarial training costs against plain training.

Each PGD step is one forward and one backward pass (with respect to the input only), and the update
is one more, so a PGD-10-AT epoch costs at most about 11 normal epochs; FGSM-AT about 2. Printed,
measured side by side in one run (strategies interleaved, median of ``--repeats``), on the
``quick`` SmallCNN (width 32) and the 4,000 mnist5k training images, batch 128:

* PGD-10-AT epoch / (11 x normal epoch)   target <= 1.15
* FGSM-AT epoch / (2 x normal epoch)      target <= 1.0
* ntklab.train's normal epoch / a bare hand-written loop (the loop's own overhead)

Then the speed options of ``TrainConfig`` (issue 20), side by side with float32 on the same model,
data and device, for a normal and a PGD-10-AT epoch (interleaved, median and minimum of the
repeats): ``amp="bf16"`` (bfloat16 autocast of the update's forward and loss; the attack stays
float32, so a PGD epoch can gain at most on 1 pass in 11), ``channels_last=True``, and both. They
are meant for a GPU (``--device cuda``); on a CPU, whether bfloat16 and channels_last help depends on
the CPU's kernels, and on a shared machine the ratios are noisy (compare the median with the
minimum). Printed as ratios option / float32; no target.

Epoch time is the loop's training time (attack + update; no evaluation or callbacks). Ratios are
printed for the median and for the minimum over repeats (the minimum is the least disturbed by other
load on a shared machine). Not a test: nothing is asserted. ``--quick`` runs a smaller variant (1,000 images, width 16).

    python bench/train.py [--quick] [--repeats 3] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ntklab
from ntklab.config import get_device
from ntklab.models import SmallCNN
from ntklab.train import TrainConfig, train

EPS, ALPHA = 0.3, 0.075


def bare_normal_epoch(model, x, y, batch_size, device) -> float:
    """A minimal SGD epoch (the reference for the loop's overhead)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    perm = torch.randperm(len(y))
    model.train()
    start = time.perf_counter()
    for idx in perm.split(batch_size):
        xb, yb = x[idx].to(device), y[idx].to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 images and width 16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    n, width = (1000, 16) if args.quick else (4000, 32)
    data = ntklab.data.subset(ntklab.data.load("mnist5k", "train"), n, seed=0)
    x, y = data.tensors
    mean, std = ntklab.data.stats("mnist5k")
    runs = {"bare": [], "normal": [], "fgsm": [], "pgd": []}
    print(f"SmallCNN width {width}, {n} images, batch 128, device {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (interleaved)")
    for rep in range(args.repeats):
        for name in runs:
            torch.manual_seed(rep)
            model = SmallCNN(width=width, mean=mean, std=std).to(device)
            if name == "bare":
                runs[name].append(bare_normal_epoch(model, x, y, 128, device))
                continue
            config = TrainConfig(strategy=name, epochs=1, batch_size=128, eps=EPS, seed=rep,
                                 **({"alpha": ALPHA, "steps": 10} if name == "pgd" else {}))
            h = train(model, data, config, device=device, progress=False)
            runs[name].append(h.training_time)
        print(f"  repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()))
    for label, pick in (("median", statistics.median), ("min", min)):
        t = {k: pick(v) for k, v in runs.items()}
        print(f"{label} epoch: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
        print(f"  PGD-10-AT / (11 x normal): {t['pgd'] / (11 * t['normal']):.3f}   (target <= 1.15)")
        print(f"  FGSM-AT   / (2 x normal):  {t['fgsm'] / (2 * t['normal']):.3f}   (target <= 1.0)")
        print(f"  train() normal / bare loop: {t['normal'] / t['bare']:.3f}   (the loop's own overhead)")
    print("speed options (TrainConfig.amp, channels_last) against float32:")
    option_rows(data, width, mean, std, device, args.repeats)

OPTIONS = {"float32": {}, "bf16": {"amp": "bf16"}, "channels_last": {"channels_last": True},
           "bf16+channels_last": {"amp": "bf16", "channels_last": True}}


def option_rows(data, width: int, mean, std, device, repeats: int) -> None:
    """Epoch times of every entry of :data:`OPTIONS` for a normal and a PGD-10-AT epoch, printed with
    their ratios to float32 (median and minimum over ``repeats``, options interleaved)."""
    for strategy in ("normal", "pgd"):
        times = {name: [] for name in OPTIONS}
        for rep in range(repeats):
            for name, options in OPTIONS.items():
                torch.manual_seed(rep)
                model = SmallCNN(width=width, mean=mean, std=std).to(device)
                config = TrainConfig(strategy=strategy, epochs=1, batch_size=128, eps=EPS, seed=rep, **options,
                                     **({"alpha": ALPHA, "steps": 10} if strategy == "pgd" else {}))
                times[name].append(train(model, data, config, device=device, progress=False).training_time)
        label = "PGD-10-AT" if strategy == "pgd" else "normal"
        for pick_name, pick in (("median", statistics.median), ("min", min)):
            t = {k: pick(v) for k, v in times.items()}
            print(f"{label} epoch, {pick_name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
            print("  / float32: " + ", ".join(f"{k} {t[k] / t['float32']:.3f}" for k in OPTIONS if k != "float32"))


if __name__ == "__main__":
    main()
