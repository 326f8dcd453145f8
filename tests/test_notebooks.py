"""The book's notebooks: committed without outputs, and each in the chapter template."""
import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
# Chapters that test no claim of a paper, by name, with the reason: they keep every other template check
# (outputs cleared, exercises, a caption saying what to look at, the "ran in" footer).
NOT_SCIENCE = {"paper_scale.ipynb": "chapter 9 documents commands, costs and storage; it runs no experiment"}


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found in book/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_template(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    code = {i: "".join(c["source"]) for i, c in enumerate(cells) if c["cell_type"] == "code"}
    hidden = {i for i in code if "remove-cell" in cells[i].get("metadata", {}).get("tags", [])}
    if path.name in NOT_SCIENCE:
        assert "Claims this chapter tests" not in text and not any("claims." in src for src in code.values()), \
            f"{path.name} is exempt from the claims template ({NOT_SCIENCE[path.name]}): drop it from NOT_SCIENCE"
    else:
        assert "Claims this chapter tests" in text, "a chapter states its claims up front"
        assert any("claims.check(" in code[i] for i in hidden), \
            "a chapter asserts its claims with ntklab.claims.check in a hidden cell (tag remove-cell)"
        assert any("claims.table(" in code[i] for i in set(code) - hidden), "a chapter shows its claims table"
    assert not any("profile.name ==" in src or "profile.name !=" in src for src in code.values()), \
        "claims say under which profiles they are asserted; the chapter does not branch on the profile"
    assert "```{exercise}" in text and "```{solution}" in text and ":class: dropdown" in text
    assert "What to look at" in text, "figures have captions saying what to look at"
    footer = "".join(cells[-1]["source"])
    assert cells[-1]["cell_type"] == "code" and "ran in" in footer, "the last cell prints the run time"


def test_exemptions_name_existing_notebooks():
    assert set(NOT_SCIENCE) <= {p.name for p in NOTEBOOKS}, "NOT_SCIENCE names a notebook that does not exist"


def test_every_chapter_is_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}
    for part in toc["parts"]:
        files |= {ch["file"] for ch in part["chapters"]}
    for nb in NOTEBOOKS:
        assert f"book/{nb.stem}" in files, f"{nb.name} is missing from _toc.yml"
    for f in files:
        assert (ROOT / f"{f}.md").exists() or (ROOT / f"{f}.ipynb").exists(), f


def test_bibliography_parses_and_has_every_cited_key():
    """A broken references.bib (an entry left open by a merge) fails the book build only at its end:
    catch it here, with every {cite:p}/{cite:t} key of the chapters present."""
    from pybtex.database import parse_file

    entries = parse_file(ROOT / "references.bib", bib_format="bibtex").entries
    cited = set()
    for page in sorted((ROOT / "book").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.md")):
        for keys in re.findall(r"\{cite:[a-z]+\}`([^`]+)`", page.read_text()):
            cited.update(k.strip() for k in keys.split(","))
    assert cited, "no citation found: the pattern above checks nothing"
    assert sorted(cited - set(entries)) == []
