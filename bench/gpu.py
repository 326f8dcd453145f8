"""Benchmark of the three costs of the ``paper`` profile, on whatever device is here, and the hours they project.

    python bench/gpu.py                              # cuda if present, else the CPU
    python bench/gpu.py --device cpu --out bench/results/cpu.json
    python bench/gpu.py --device cuda --out bench/results/a100.json

Measured on PreAct ResNet-18 (``ntklab.models.PreActResNet18``, width 64, 10 classes, 11.2M parameters)
and random CIFAR-shaped inputs (3 x 32 x 32 in [0, 1]; the cost does not depend on the pixels),
each time the median of ``--repeats`` runs after a warm-up, CUDA synchronised:

* ``seconds_per_pass``: one PGD-10 training step at batch 128 as ``ntklab.train`` takes it (train
  mode; ``ntklab.attacks.adversarial_examples("pgd", ...)`` with eps 8/255, step 2/255, 10 steps,
  then ``ntklab.train.sgd_step``), divided by 11 x 128: the time of one forward and backward pass of
  one image, the unit of :func:`ntklab.plan.project`;
* ``kernel_500_seconds``: a 500 x 500 trace kernel (``ntklab.ntk.empirical_ntk(..., kind="trace")``).
  On a GPU it is measured at n = 500; on the CPU at smaller n (``--kernel-n``) and extrapolated with
  a fit ``t(n) = a n + b n^2`` (the per-image features and the pair contractions), and the output
  says so (``kernel_extrapolated``);
* ``autoattack_seconds_per_image``: on an untrained network AutoAttack skips the points it already
  misclassifies, so its run time would mean nothing. What is timed is one APGD-CE run of
  pyautoattack (``APGDAttack.attack_single_run``, which runs all its iterations on every point given),
  per iteration and image, times the iteration budget of standard AutoAttack (Croce & Hein 2020) for
  a point that survives all four attacks: APGD-CE 100, APGD-T 9 x 100, FAB-T 9 x 100 (counted as one
  pass each) and Square 5,000 queries (forward only, counted as 1/3 pass each), 3,567 in all. It is
  an upper bound per point: points broken early cost less.

Also printed and stored: the FLOPs of one forward and backward pass of one image, counted by
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2), the rate this device achieved
on the PGD step, and a FLOP-based estimate for a GPU that is not here (``--gpu-tflops`` x
``--gpu-utilisation``, labelled as an estimate: all three costs scaled by the ratio of that sustained
rate to the rate achieved here). Then :func:`ntklab.plan.project` of :func:`ntklab.plan.plan` of the
``paper`` profile with the measured costs: hours per experiment and in total. Chapter 9 shows the
committed CPU output (``bench/results/cpu.json``: 2 threads, ``OMP_WAIT_POLICY=PASSIVE``, load average
1.1; the same run while the 2 cores were shared, load 8-9, measured a pass 4x slower: the file records
the load). On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE`` (see ``bench/ntk.py``). Not a test: nothing
is asserted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from ntklab.config import get_device

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
# Standard AutoAttack's budget per point that survives every attack (Croce & Hein 2020), in passes.
AA_PASSES = {"apgd-ce": 100, "apgd-t": 9 * 100, "fab-t": 9 * 100, "square": 5000 / 3}
# An A100's dense tensor-core peak, NVIDIA's data sheet: TF32 156 TFLOP/s (PyTorch's default for
# cuDNN convolutions in float32), bf16 312 TFLOP/s. The utilisation is the book's assumption.
GPU_NAME, GPU_TFLOPS, GPU_UTILISATION = "NVIDIA A100 (TF32 tensor-core peak)", 156.0, 0.1


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _model(device):
    from ntklab.models import PreActResNet18
    torch.manual_seed(0)
    return PreActResNet18(num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD).to(device)


def _inputs(n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def pgd_step(device, batch: int, repeats: int) -> list[float]:
    """Seconds of PGD-10 training steps at ``batch`` (after one warm-up step)."""
    from ntklab import attacks
    from ntklab.train import attack_arguments, sgd_step
    model = _model(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    kw = attack_arguments("pgd", EPS, ALPHA, STEPS)          # eval-mode BN in the attack, as train's default
    x, y = _inputs(batch, device)

    def step(steps=STEPS):
        xa = attacks.adversarial_examples("pgd", model, x, y, **{**kw, "steps": steps})
        sgd_step(model, opt, xa, y)
    _timed(lambda: step(1), device)                          # warm-up: first-call costs, allocator
    return [_timed(step, device) for _ in range(repeats)]


def kernel_times(device, sizes, repeats: int) -> dict[int, float]:
    """Median seconds of an n x n trace kernel for each n (after a warm-up on 4 images)."""
    from ntklab.ntk import empirical_ntk
    model = _model(device).eval()
    x, _ = _inputs(max(sizes), device, seed=1)
    empirical_ntk(model, x[:4], kind="trace")
    return {n: statistics.median(_timed(lambda: empirical_ntk(model, x[:n], kind="trace"), device)
                                 for _ in range(repeats)) for n in sizes}


def fit_kernel(times: dict[int, float], n_target: int = 500) -> tuple[float, float, float]:
    """Least-squares fit t(n) = a n + b n^2 (a, b >= 0) and its value at n_target: (a, b, t)."""
    ns = torch.tensor(list(times), dtype=torch.float64)
    ts = torch.tensor(list(times.values()), dtype=torch.float64)
    A = torch.stack([ns, ns ** 2], 1)
    a, b = torch.linalg.lstsq(A, ts[:, None]).solution.flatten().tolist()
    if a < 0 or b < 0:                                       # a one-term fit when noise flips a sign
        b = max(0.0, float((ns ** 2 * ts).sum() / (ns ** 4).sum())) if a < 0 else 0.0
        a = 0.0 if a < 0 else float((ns * ts).sum() / (ns ** 2).sum())
    return a, b, a * n_target + b * n_target ** 2


def apgd_time(device, n: int, iterations: int, repeats: int) -> list[float]:
    """Seconds of one APGD-CE run (``iterations`` iterations, every point attacked throughout)."""
    from pyautoattack.autopgd_base import APGDAttack
    model = _model(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, _ = _inputs(n, device, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)              # labels the net predicts: every point starts correctly classified
    attack = APGDAttack(model, n_iter=iterations, norm="Linf", eps=EPS, seed=0, loss="ce", device=device)
    attack.init_hyperparam(x)
    attack_warm = APGDAttack(model, n_iter=2, norm="Linf", eps=EPS, seed=0, loss="ce", device=device)
    attack_warm.init_hyperparam(x)
    _timed(lambda: attack_warm.attack_single_run(x, y), device)
    return [_timed(lambda: attack.attack_single_run(x, y), device) for _ in range(repeats)]


def pass_flops() -> int:
    """FLOPs of one forward and backward pass (parameters and input) of one 32 x 32 image."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    model = _model(torch.device("cpu")).train()
    x, y = _inputs(2, torch.device("cpu"))
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() // 2


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} logical CPUs)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present, else cpu)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the costs and raw timings here")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (median)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--kernel-repeats", type=int, default=None,
                        help="timed runs of each kernel size (default: --repeats); kernels are the slow part on a CPU")
    parser.add_argument("--kernel-n", type=int, nargs="+", default=None,
                        help="kernel sizes to time (default: 500 on a GPU; 4 8 16 on the CPU, extrapolated)")
    parser.add_argument("--aa-images", type=int, default=None, help="APGD-CE batch (default 250 GPU, 16 CPU)")
    parser.add_argument("--aa-iterations", type=int, default=None, help="APGD-CE iterations (default 100 GPU, 10 CPU)")
    parser.add_argument("--gpu-tflops", type=float, default=GPU_TFLOPS, help="peak of the GPU of the estimate")
    parser.add_argument("--gpu-utilisation", type=float, default=GPU_UTILISATION,
                        help="fraction of that peak assumed sustained")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    gpu = device.type == "cuda"
    sizes = args.kernel_n or ([500] if gpu else [4, 8, 16])
    aa_n = args.aa_images or (250 if gpu else 16)
    aa_iters = args.aa_iterations or (100 if gpu else 10)
    name = device_name(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"Device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"PreAct ResNet-18, 10 classes, random 3x32x32 inputs; median of {args.repeats} after a warm-up.")

    flops = pass_flops()
    print(f"FLOPs of one forward+backward pass of one image (FlopCounterMode, multiply-add = 2): {flops / 1e9:.2f} G")

    steps = pgd_step(device, args.batch, args.repeats)
    step = statistics.median(steps)
    per_pass = step / ((STEPS + 1) * args.batch)
    rate = flops / per_pass
    print(f"PGD-10 training step, batch {args.batch}: {step:.2f} s (runs {', '.join(f'{t:.2f}' for t in steps)}); "
          f"per pass per image {per_pass * 1e3:.2f} ms, {rate / 1e12:.3f} TFLOP/s achieved")

    ktimes = kernel_times(device, sizes, args.kernel_repeats or args.repeats)
    extrapolated = sizes != [500]
    a, b, k500 = fit_kernel(ktimes) if extrapolated else (None, None, ktimes[500])
    print("Trace kernel: " + ", ".join(f"n = {n}: {t:.2f} s" for n, t in ktimes.items()) +
          (f"; fit {a:.3g} n + {b:.3g} n^2 -> n = 500: {k500:.0f} s (EXTRAPOLATED)" if extrapolated
           else " (measured at n = 500)"))

    aa = apgd_time(device, aa_n, aa_iters, args.repeats)
    per_iter = statistics.median(aa) / (aa_n * aa_iters)
    aa_image = per_iter * sum(AA_PASSES.values())
    print(f"APGD-CE, {aa_n} images x {aa_iters} iterations (every point attacked throughout): "
          f"{statistics.median(aa):.2f} s, {per_iter * 1e3:.2f} ms per iteration and image; x "
          f"{sum(AA_PASSES.values()):.0f} iterations of standard AutoAttack on a point that survives it: "
          f"{aa_image:.2f} s per image (an upper bound per point)")

    costs = {"seconds_per_pass": per_pass, "kernel_500_seconds": k500, "autoattack_seconds_per_image": aa_image}
    sustained = args.gpu_tflops * 1e12 * args.gpu_utilisation
    scale = rate / sustained
    estimate = {"gpu": GPU_NAME if args.gpu_tflops == GPU_TFLOPS else f"a GPU of {args.gpu_tflops} TFLOP/s peak",
                "peak_tflops": args.gpu_tflops, "utilisation": args.gpu_utilisation,
                "note": "an ESTIMATE, not a measurement: the costs measured here scaled by the ratio of the FLOP "
                        "rate achieved here to the assumed sustained rate (peak x utilisation, the book's "
                        "assumption)",
                **{k: v * scale for k, v in costs.items()}}
    result = {"device": str(device), "device_name": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "load_average": {"start": load_before, "end": os.getloadavg() if load_before else None,
                               "note": "1, 5, 15-minute load averages of the machine: other processes share it"},
              "when": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              **costs,
              "kernel_extrapolated": extrapolated,
              "raw": {"model": "PreActResNet18(width=64), 10 classes, 11.2M parameters", "batch": args.batch,
                      "pgd": {"eps": EPS, "alpha": ALPHA, "steps": STEPS}, "pgd_step_seconds": steps,
                      "kernel_seconds": {str(n): t for n, t in ktimes.items()},
                      "kernel_fit": None if a is None else {"a_per_image": a, "b_per_pair": b},
                      "apgd_ce": {"images": aa_n, "iterations": aa_iters, "seconds": aa,
                                  "seconds_per_iteration_image": per_iter},
                      "autoattack_passes_per_image": AA_PASSES,
                      "forward_backward_flops_per_image": flops, "achieved_tflops": rate / 1e12,
                      "repeats": args.repeats, "kernel_repeats": args.kernel_repeats or args.repeats},
              "gpu_estimate": estimate}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")

    from ntklab import plan
    runs = plan.plan("paper")
    for label, c in (("on this device (measured)", costs),
                     (f"on {estimate['gpu']} at {args.gpu_utilisation:.0%} (ESTIMATE)", estimate)):
        hours = plan.project(runs, c)
        print(f"Projected hours of the paper profile {label}:")
        for exp, h in hours.items():
            print(f"  {exp:16} {h:10.1f} h")
        print(f"  {'total':16} {sum(hours.values()):10.1f} h")
    return result


if __name__ == "__main__":
    main()
