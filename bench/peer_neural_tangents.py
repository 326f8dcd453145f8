"""The peer side of ``bench/ntk.py --peer PYTHON``: the empirical NTK of the benchmark's CNN with
neural-tangents (Novak, Sohl-Dickstein & Schoenholz 2022, "Fast Finite Width Neural Tangent Kernel"),
timed in this process.

Run by ``bench/ntk.py`` with an interpreter that has neural-tangents (0.6.5 with jax/jaxlib 0.4.23
and numpy 1.26.4 resolve together); it imports neither torch nor ntklab, and neural-tangents is never
a dependency of ntklab. One measurement per process:

    PYTHON bench/peer_neural_tangents.py '{"kind": "trace", "implementation": "structured",
        "weights": "w.npz", "inputs": "x.npy", "repeats": 3, "kernel_out": "k.npy"}'

The network is the one ``bench/ntk.py`` builds in PyTorch (``_peer_twin``): conv3x3(32)-ReLU-avgpool2,
conv3x3(64)-ReLU-avgpool2, dense(128)-ReLU, dense(10), with biases, in neural-tangents' "standard"
parameterisation (outputs = inputs @ W + b, so the same weights give the same function), built with
``neural_tangents.stax`` and given the PyTorch twin's weights (converted from NCHW/OIHW to NHWC/HWIO).
Inputs are the same normalised images. The kernel function is jit-compiled and called once on the
timed inputs before timing (so compilation is excluded, as ntklab's warm-up excludes its first-call
costs); the time is the best of ``repeats`` calls, each waited for with ``block_until_ready``.
Prints one JSON line: time, times, peak_mb (maximum resident set size), base_mb (before the first
call), and writes the kernel to ``kernel_out`` when given, so the parent checks both libraries compute
the same numbers.
"""
import json
import resource
import sys
import time

from ntk import _rss_mb      # bench/ntk.py, beside this file (its module level imports only the standard library)


def network():
    from neural_tangents import stax

    std = dict(parameterization="standard", b_std=1.0)       # b_std=None would mean no biases
    return stax.serial(
        stax.Conv(32, (3, 3), padding="SAME", **std), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2)),
        stax.Conv(64, (3, 3), padding="SAME", **std), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2)),
        stax.Flatten(), stax.Dense(128, **std), stax.Relu(), stax.Dense(10, **std))


def params_from_torch(weights, init_params):
    """The PyTorch twin's weights in neural-tangents' layout, each reshaped to the shape its init has."""
    import numpy as np

    w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    c2 = w["conv2.weight"].shape[0]
    dense1 = w["fc1.weight"].reshape(-1, c2, 7, 7).transpose(2, 3, 1, 0).reshape(7 * 7 * c2, -1)  # (C,H,W) -> (H,W,C)
    ours = {0: (w["conv1.weight"].transpose(2, 3, 1, 0), w["conv1.bias"]),           # OIHW -> HWIO
            3: (w["conv2.weight"].transpose(2, 3, 1, 0), w["conv2.bias"]),
            7: (dense1, w["fc1.bias"]), 9: (w["fc2.weight"].T, w["fc2.bias"])}
    params = []
    for i, p in enumerate(init_params):
        if i in ours:
            W, b = ours[i]
            assert W.shape == p[0].shape, (i, W.shape, p[0].shape)
            params.append((W, b.reshape(p[1].shape)))
        else:
            params.append(p)
    return params


def main(spec: dict) -> dict:
    import jax
    import numpy as np
    import neural_tangents as nt

    init_fn, apply_fn, _ = network()
    x = np.load(spec["inputs"]).transpose(0, 2, 3, 1)                       # NCHW -> NHWC
    _, init_params = init_fn(jax.random.PRNGKey(0), x.shape)
    params = params_from_torch(dict(np.load(spec["weights"])), init_params)
    implementation = {"structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
                      "jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION}[spec["implementation"]]
    kernel_fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,) if spec["kind"] == "trace" else (),
                                            vmap_axes=0, implementation=implementation))
    x = jax.device_put(x)
    base = _rss_mb()
    K = kernel_fn(x, None, params).block_until_ready()                      # compiles, then runs
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        kernel_fn(x, None, params).block_until_ready()
        times.append(time.perf_counter() - t)
    if spec.get("kernel_out"):
        np.save(spec["kernel_out"], np.asarray(K))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"time": min(times), "times": times, "peak_mb": peak, "base_mb": base,
            "versions": {"neural_tangents": nt.__version__, "jax": jax.__version__}}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
