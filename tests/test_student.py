"""The student edition (ntklab.student): no solutions, no claim checks, every exercise, outputs
cleared, checkable answers that the edition does not reveal, and chapters that still run."""
import hashlib
import json
import math
import re
from fractions import Fraction

import pytest
import yaml

from ntklab import _answers, student

ROOT = student.REPO
SOLUTION_OPENER = re.compile(r"^ {0,3}(`{3,}|~{3,}|:{3,})\s*\{solution")


def markdown(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def code(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "edition"
    paths = student.student_edition(out)
    return out, {p.name: json.loads(p.read_text()) for p in paths}


def book() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in student.chapters()}


# ------------------------------------------------------------------ reading the book
def test_chapters_are_the_notebooks_of_the_toc_in_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    expected = [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").is_file()]
    assert len(expected) >= 8 and student.chapters() == expected


def test_stripping_reads_fences_as_commonmark_does():
    """Negative control: a solution opened with four backticks holds a code fence of three, which a
    reader that stopped at the first closing fence would leave half in the text. A ``{solution}``
    shown inside a code block is an example and stays; one inside another directive goes."""
    text = "\n".join([
        "Intro.", "",
        "```{exercise}", ":label: ex-a", "", "Compute it.", "```", "",
        "````{solution} ex-a", ":class: dropdown", "", "Like this:", "", "```python",
        "secret = 42", "```", "", "and that's all.", "````", "",
        "~~~markdown", "```{solution} shown-not-run", "kept literal", "```", "~~~", "",
        "`````{admonition} Note", "```{solution} inner", "hidden inner", "```", "visible note", "`````", "",
        "```{exercise}", ":label: ex-b", "", "Then this.", "```", "",
        "```{solution} ex-b", "gone too", "```",
    ])
    out = student.strip_solutions(text)
    for gone in ("secret = 42", "that's all", "Like this", "hidden inner", "gone too", "```python"):
        assert gone not in out
    for kept in ("Intro.", "Compute it.", "Then this.", "kept literal", "```{solution} shown-not-run", "visible note"):
        assert kept in out
    assert student.exercise_labels(text) == ["ex-a", "ex-b"]
    # every fence left is closed: the text alternates openers and closers
    fences = [line for line in out.splitlines() if re.match(r"^(`{3,}|~{3,})", line)]
    assert fences == ["```{exercise}", "```", "~~~markdown", "```{solution} shown-not-run", "```", "~~~",
                      "`````{admonition} Note", "`````", "```{exercise}", "```"]
    assert "\n\n\n" not in out
    # an unclosed solution runs to the end of the cell, as an unclosed fence does in CommonMark
    assert student.strip_solutions("a\n\n```{solution} x\nopen to the end\n") == "a\n"
    # sphinx-exercise's gated form goes from its start to its end; one left open is refused
    gated = "a\n\n```{solution-start} x\n```\nsecret\n```python\ncode = 1\n```\n```{solution-end}\n```\n\nb"
    assert student.strip_solutions(gated) == "a\n\nb"
    with pytest.raises(ValueError, match="solution-end"):
        student.strip_solutions("a\n```{solution-start} x\n```\nsecret\n")


# ------------------------------------------------------------------ the edition of the book
def test_edition_has_every_exercise_and_no_solution_nor_claim_check(edition):
    out, nbs = edition
    source = book()
    assert sorted(nbs) == sorted(source)
    assert any("claims.check(" in c for nb in source.values() for c in code(nb)), "nothing to remove: no control"
    for name, nb in nbs.items():
        text = markdown(nb)
        labels = student.exercise_labels(markdown(source[name]))
        assert labels and student.exercise_labels(text) == labels, name
        assert not [line for line in text.splitlines() if SOLUTION_OPENER.match(line)], name
        assert "% check" not in text and ":class: dropdown" not in text, name
        assert not [c for c in code(nb) if "claims.check(" in c], name
        assert sum(map(len, code(nb))) >= sum(len(c) for c in code(source[name]) if "claims.check(" not in c)
        assert "Student edition" in "".join(nb["cells"][0]["source"]), name
        assert all(c["outputs"] == [] and c["execution_count"] is None
                   for c in nb["cells"] if c["cell_type"] == "code"), name


def test_edition_notebooks_are_valid_and_the_book_is_unchanged(edition, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    out, nbs = edition
    before = {p: p.read_bytes() for p in student.chapters()}
    for name in nbs:
        nbformat.validate(nbformat.read(out / name, as_version=4))
    student.student_edition(tmp_path / "again")
    assert {p: p.read_bytes() for p in student.chapters()} == before


def test_a_check_cell_follows_each_exercise_with_a_numerical_answer(edition):
    _, nbs = edition
    found = {}
    for nb in nbs.values():
        cells = nb["cells"]
        for prev, cell in zip(cells, cells[1:]):
            m = re.search(r'check_answer\("([\w-]+)"', "".join(cell["source"]))
            if cell["cell_type"] == "code" and m:
                assert prev["cell_type"] == "markdown"
                assert student.exercise_labels("".join(prev["source"]))[-1] == m.group(1)
                found[m.group(1)] = "".join(cell["source"])
    assert sorted(found) == sorted(_answers.TABLE)
    for label, src in found.items():
        assert all(f"{part}=None" in src for part in _answers.TABLE[label])


def test_negative_controls_a_book_with_outputs_and_a_nested_solution(tmp_path):
    """A tiny book whose notebook has outputs, a claims check, a solution with a nested fence and
    no cell ids: the edition clears, removes and strips each, and gives the cells ids."""
    (tmp_path / "book").mkdir()
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/ch\n")
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["# A chapter\n"]},
        {"cell_type": "code", "metadata": {}, "execution_count": 3, "source": ["x = 1\n", "x"],
         "outputs": [{"output_type": "execute_result", "execution_count": 3, "metadata": {},
                      "data": {"text/plain": ["1"]}}]},
        {"cell_type": "code", "metadata": {"tags": ["remove-cell"]}, "execution_count": None, "outputs": [],
         "source": ["ntklab.claims.check(claims, profile)"]},
        {"cell_type": "code", "metadata": {"tags": ["remove-cell"]}, "execution_count": None, "outputs": [],
         "source": ["hidden_but_kept = 1"]},
        {"cell_type": "markdown", "metadata": {}, "source": [
            "```{exercise}\n", ":label: ch-ex\n", "\n", "Do it.\n", "```\n", "\n",
            "````{solution} ch-ex\n", "```python\n", "answer = 7\n", "```\n", "````\n"]},
    ]
    nb = {"cells": cells, "metadata": {"widgets": {"state": {}}}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "book" / "ch.ipynb").write_text(json.dumps(nb))
    for rel in student.DATA_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"data of {rel}")
    [path] = student.student_edition(tmp_path / "out", root=tmp_path)
    assert all((tmp_path / "out" / rel).read_text() == f"data of {rel}" for rel in student.DATA_FILES)
    assert student.book_answers(tmp_path) == {}
    got = json.loads(path.read_text())
    assert "answer = 7" not in path.read_text() and "Do it." in markdown(got)
    assert code(got) == ["x = 1\nx", "hidden_but_kept = 1"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in got["cells"] if c["cell_type"] == "code")
    ids = [c["id"] for c in got["cells"]]
    assert len(set(ids)) == len(ids) == 5 and "widgets" not in got["metadata"]


def test_refuses_a_file_the_book_folder_and_a_folder_without_toc(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match="out must be a folder"):
        student.student_edition(file)
    for bad in (ROOT / "book", ROOT / "book" / "student"):
        with pytest.raises(ValueError, match="out must not be the book's own folder"):
            student.student_edition(bad)
    assert not (ROOT / "book" / "student").exists()
    with pytest.raises(ValueError, match="root must be the book's folder"):
        student.student_edition(tmp_path / "out", root=tmp_path)


def test_command_line(tmp_path, capsys):
    assert student.main([str(tmp_path / "ed")]) == 0
    assert "wrote the student edition of" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ed").glob("*.ipynb")) == sorted(p.name for p in student.chapters())
    assert student.main([str(ROOT / "book")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntklab: error: out must not be") and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    assert student.main([str(tmp_path / "file" / "sub")]) == 1    # cannot create a folder under a file
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        student.main([])
    assert exc.value.code == 2


# ------------------------------------------------------------------ the answers
def test_the_stored_table_is_the_one_the_solutions_give():
    answers = student.book_answers()
    assert student.answer_table(answers, salt=_answers.SALT) == _answers.TABLE, \
        "the solutions' answers changed: run ntklab.student.write_answer_table()"
    every_label = {label for nb in book().values() for label in student.exercise_labels(markdown(nb))}
    assert set(_answers.TABLE) <= every_label
    for parts in _answers.TABLE.values():
        for entry in parts.values():
            assert set(entry) == {"decimals", "about", "sha256"}    # no plain answer


def earliest_switch(k: int, epochs: int, saving=Fraction(3, 10)) -> int:
    """The first s with (s / E) (k / (k + 1)) >= saving, exactly (schedule.ipynb's formula)."""
    return next(s for s in range(epochs + 1) if Fraction(s, epochs) * Fraction(k, k + 1) >= saving)


def test_check_answer_says_right_and_wrong_without_the_answer(capsys):
    right = {"pgd3": earliest_switch(3, 10), "pgd10": earliest_switch(10, 200)}
    assert student.grade("schedule-ex-cost", **right) == {"pgd3": True, "pgd10": True}
    assert student.grade("schedule-ex-cost", pgd3=right["pgd3"] + 1) == {"pgd3": False, "pgd10": None}
    student.check_answer("schedule-ex-cost", pgd3=right["pgd3"], pgd10=right["pgd10"] - 1)
    printed = capsys.readouterr().out
    assert "pgd3: right" in printed and "pgd10: wrong" in printed and str(right["pgd10"]) not in printed
    # E[s^2] for log s uniform on [-3, 0], by the midpoint rule: compared at 3 decimals
    n = 100_000
    mean_s2 = sum(math.exp(2 * (-3 + 3 * (i + 0.5) / n)) for i in range(n)) / n
    assert student.grade("overfitting-ex-covariance", mean_s2=mean_s2) == {"mean_s2": True}
    assert student.grade("overfitting-ex-covariance", mean_s2=round(mean_s2, 2)) == {"mean_s2": False}


def test_check_answer_refuses_bad_input():
    with pytest.raises(ValueError, match="label must be an exercise"):
        student.grade("no-such-exercise", x=1)
    with pytest.raises(ValueError, match="pgd5 is not a part of schedule-ex-cost"):
        student.check_answer("schedule-ex-cost", pgd5=4)
    for bad in ("4", math.nan, True):
        with pytest.raises(ValueError, match="pgd3 must be a finite number"):
            student.grade("schedule-ex-cost", pgd3=bad)


def test_answer_table_hashes_the_rounded_answer_and_refuses_a_rounding_boundary():
    table = student.answer_table({"ex": {"a": (0.16625, 3, "a number")}}, salt="s")
    assert table["ex"]["a"]["sha256"] == hashlib.sha256(b"s|ex|a|0.166").hexdigest()
    with pytest.raises(ValueError, match=r"answers\['ex'\]\['a'\].*rounding boundary"):
        student.answer_table({"ex": {"a": (0.1665, 3, "a number")}}, salt="s")


# ------------------------------------------------------------------ the edition runs
@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """One fresh result cache for the chapters of the edition (so nothing the book computed helps;
    a chapter that reuses another's experiment finds it here)."""
    return tmp_path_factory.mktemp("student_results")


@pytest.mark.parametrize("name", [p.name for p in student.chapters()])
def test_the_edition_executes_under_smoke(name, edition, smoke_results, monkeypatch):
    """Each chapter of the edition runs from the edition's folder under the smoke profile, and its
    check cells run unanswered."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out, _ = edition
    monkeypatch.setenv("NTKLAB_PROFILE", "smoke")
    monkeypatch.setenv("NTKLAB_RESULTS", str(smoke_results))
    monkeypatch.setenv("NTKLAB_PROGRESS", "0")
    nb = nbformat.read(out / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(out)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code" and "check_answer(" in cell.source:
            text = "".join(o.get("text", "") for o in cell.outputs)
            assert "not answered yet" in text and "right" not in text


def test_book_answers_reads_the_check_lines_and_refuses_a_malformed_one(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "_toc.yml").write_text("root: book/ch\n")
    solution = ["```{solution} ch-ex\n", "Four.\n", "\n", "% check n = 4 (decimals 0): the number\n", "```\n"]
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": solution}], "metadata": {},
          "nbformat": 4, "nbformat_minor": 4}
    (tmp_path / "book" / "ch.ipynb").write_text(json.dumps(nb))
    assert student.book_answers(tmp_path) == {"ch-ex": {"n": (4.0, 0, "the number")}}
    solution[3] = "% check n = 4: the number\n"
    (tmp_path / "book" / "ch.ipynb").write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="ch.ipynb, solution ch-ex: cannot read"):
        student.book_answers(tmp_path)
