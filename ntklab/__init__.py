"""ntklab: the package behind the book on the neural tangent kernel and adversarial training.

The book ("ntklab") reproduces and extends Li et al., "Rethinking Adversarial Training with
Neural Tangent Kernel" (arXiv 2312.02236), together with Tsilivis & Kempe (NeurIPS 2022) and
Loo et al. (NeurIPS 2022). A chapter explains; this package computes.
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

_SUBMODULES = ("config", "data", "models", "ntk", "metrics", "attacks", "train", "callbacks", "evaluate",
               "experiments", "plots", "widgets", "kernels", "linearize", "claims", "bn", "noise", "clock", "augment",
               "student", "distributed", "plan")

__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    # Sub-modules load on first use (``ntklab.data.load(...)`` works after ``import ntklab``)
    # so that importing the package stays cheap.
    if name in _SUBMODULES:
        module = _import_module(f"ntklab.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ntklab' has no attribute {name!r}")
