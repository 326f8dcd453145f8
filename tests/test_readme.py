"""The README's code runs as written (offline, on the CPU)."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README shows how to use the package"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    K, x, x_adv = namespace["K"], namespace["x"], namespace["x_adv"]
    assert K.shape == (64, 64) and torch.allclose(K, K.T, rtol=1e-4, atol=1e-3)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_readme_names_the_three_commands():
    text = (ROOT / "README.md").read_text()
    for command in ("python -m pip install -r requirements.txt", "jupyter-book build .", "pytest"):
        assert command in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -r requirements.txt" in ci and "python -m pytest" in ci
    assert "jupyter-book build ." in ci


def test_readme_claims_example_runs_under_smoke(tmp_path, monkeypatch):
    """The README's second example (an experiment's analysis and claims without the book), run
    under the smoke profile: the table lists every claim and check asserts none of quick's there."""
    text = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[1]
    assert block.count('"quick"') == 4
    monkeypatch.setenv("NTKLAB_RESULTS", str(tmp_path))
    monkeypatch.setenv("NTKLAB_PROGRESS", "0")
    namespace = {}
    exec(compile(block.replace('"quick"', '"smoke"'), "README.md", "exec"), namespace)
    claims = namespace["claims"]
    assert claims and len(namespace["ntklab"].claims.table(claims, "smoke").rows()) == len(claims)
