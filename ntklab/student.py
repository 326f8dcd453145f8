"""The student edition of the book: every chapter without the exercises' solutions, for a class.

    python -m ntklab student-edition OUT        # or ntklab.student.student_edition(OUT)

:func:`student_edition` writes every chapter notebook of ``_toc.yml`` to the folder ``OUT`` with
every ``{solution}`` block removed from the markdown (the exercises stay), the hidden cells that
assert the chapter's claims (tag ``remove-cell``, ``ntklab.claims.check(``) removed, prose and the
rest of the code kept, outputs and execution counts cleared, and a note at the top saying that it is
the student edition. It is the book's answer to fast.ai's ``clean/`` notebooks (issue 21).

Exercises whose answer is a number fixed by the text get a cell right after them that calls
:func:`check_answer`: the student fills in numbers and reads, per part, "right" or "wrong". The
answers live in the book's solutions, as MyST comment lines that the built book does not show::

    % check pgd3 = 4 (decimals 0): the earliest switch epoch s with PGD-3 and 10 epochs

:func:`book_answers` reads them and :func:`answer_table` turns them into the table this module
checks against, :data:`ntklab._answers.TABLE`: for each part the number of decimals, what the part
asks, and the SHA-256 of a salt, the exercise, the part and the answer rounded to those decimals.
Never the answer: the edition and the package carry only the hashes (the solutions, with the plain
answers, are stripped from the edition). A student can still try every small integer or every
3-decimal number until one is "right": this is a self-check, not an exam. ``tests/test_student.py``
checks that the stored table is the one the book's solutions give (regenerate it with
:func:`write_answer_table` after changing an answer).

Exercises without a check have answers that are proofs, explanations, designs, or numbers of the
reader's own run (which depend on its random numbers and its profile).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

__all__ = ["student_edition", "strip_solutions", "exercise_labels", "chapters", "book_answers",
           "answer_table", "write_answer_table", "grade", "check_answer", "main"]

PROG = "python -m ntklab student-edition"
#: The repository of this package (the book's ``_toc.yml`` is at its root when run from a checkout).
REPO = Path(__file__).resolve().parents[1]
#: Files the chapters read, relative to the repository root, copied to the same place under the
#: edition's folder (chapter 9 looks for ``bench/results/cpu.json`` from its working folder upwards).
DATA_FILES = ("bench/results/cpu.json",)
#: Directives whose body is literal text (a ``{solution}`` written inside one is an example, not a solution).
LITERAL = {"code", "code-block", "code-cell", "sourcecode", "literalinclude", "math", "raw", "eval-rst"}
NOTE = ("**Student edition.** This is *{title}* from the ntklab book without the solutions of its "
        "exercises and without the hidden cells that assert the chapter's claims; outputs are cleared. "
        "Run it from the top (Kernel, Restart & Run All). An exercise with a numerical answer is "
        "followed by a `check_answer` cell: put your numbers in place of `None` and run it to see "
        "whether each is right (it never shows the answer).")

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,}|:{3,})\s*(.*?)\s*$")
_DIRECTIVE = re.compile(r"^\{([\w:.-]+)\}\s*(.*)$")
_CLAIMS_CHECK = re.compile(r"\bclaims\.check\(")
_ANSWER = re.compile(r"^\s*%\s*check\s+([A-Za-z_]\w*)\s*=\s*(\S+)\s+\(decimals\s+(\d+)\)\s*:\s*(.+?)\s*$")


# ------------------------------------------------------------------ reading the book
def _root(root) -> Path:
    root = REPO if root is None else Path(root)
    if not (root / "_toc.yml").is_file():
        raise ValueError(f"root must be the book's folder (the one with _toc.yml); {root} has no _toc.yml")
    return root.resolve()


def chapters(root=None) -> list[Path]:
    """The chapter notebooks of the book at ``root`` (default: this package's repository), in the
    order of its ``_toc.yml`` (:func:`ntklab._book.chapters`; the markdown pages are not chapters)."""
    from ntklab import _book

    root = _root(root)
    return [root / f"{name}.ipynb" for name in _book.chapters(root)]


def _fence_end(lines: list[str], start: int, fence: str) -> int:
    """Index of the line closing a fence opened with ``fence`` (CommonMark: the same character, at
    least as many of it, nothing else on the line), or ``len(lines)`` if it is never closed."""
    close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    return next((j for j in range(start, len(lines)) if close.match(lines[j])), len(lines))


def _option(body: list[str], name: str) -> str | None:
    """The value of the directive option ``:name: value`` at the top of a directive's body."""
    for line in body:
        m = re.match(r"^\s*:([\w-]+):\s*(.*?)\s*$", line)
        if not m:
            break
        if m.group(1) == name:
            return m.group(2)
    return None


class _Scan:
    """A markdown text read fence by fence: its lines without the solutions (``lines``, with an
    ``("exercise", label)`` marker after each top-level exercise), the solutions dropped
    (``solutions``: ``(label, body lines)``) and every exercise label (``exercises``)."""

    def __init__(self, lines: list[str], top: bool = True):
        self.lines, self.solutions, self.exercises = [], [], []
        i = 0
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if not m:
                self.lines.append(lines[i])
                i += 1
                continue
            end = _fence_end(lines, i + 1, m.group(2))
            d = _DIRECTIVE.match(m.group(3))
            name, body = (d.group(1) if d else None), lines[i + 1:end]
            if name == "solution-start":                  # sphinx-exercise's gated form: up to its end
                end = self._gated_end(lines, end + 1)
                body = lines[i + 1:end]
            if name in ("solution", "solution-start"):
                self.solutions.append((d.group(2), body))
                i = end + 1
                if self.lines and not self.lines[-1].strip() and i < len(lines) and not lines[i].strip():
                    i += 1                                   # no double blank line where it was
                continue
            if name and name not in LITERAL:                  # a directive's body is markdown: look inside
                inner = _Scan(body, top=False)
                self.solutions += inner.solutions
                self.exercises += inner.exercises
                self.lines += [lines[i], *inner.lines, *lines[end:end + 1]]
            else:                                             # a code block: literal
                self.lines += lines[i:end + 1]
            if name in ("exercise", "exercise-start"):
                label = _option(body, "label")
                self.exercises.append(label)
                if top:
                    self.lines.append(("exercise", label))
            i = end + 1

    @staticmethod
    def _gated_end(lines: list[str], start: int) -> int:
        """Index of the closing line of the ``{solution-end}`` fence after ``start``; a gated solution
        that does not end in the same markdown cell is refused (it would leave part of it behind)."""
        i = start
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if m:
                end = _fence_end(lines, i + 1, m.group(2))
                if m.group(3).startswith("{solution-end}"):
                    return min(end, len(lines) - 1)
                i = end
            i += 1
        raise ValueError("a {solution-start} block must end with {solution-end} in the same markdown cell")

    def text(self) -> str:
        return "\n".join(x for x in self.lines if isinstance(x, str))


def strip_solutions(text: str) -> str:
    """``text`` (MyST markdown) without its ``{solution}`` blocks. Fences are read as CommonMark
    reads them: a block opened with n backticks (or tildes, or MyST colons) ends at the first line of
    at least n of the same character and nothing else, so code fences nested in a solution (opened
    with more backticks) go with it; directives' bodies are searched, code blocks are not."""
    return _Scan(text.splitlines()).text()


def exercise_labels(text: str) -> list[str]:
    """The ``:label:`` of every ``{exercise}`` block of the markdown ``text``, in order."""
    return _Scan(text.splitlines()).exercises


# ------------------------------------------------------------------ the answers
def book_answers(root=None) -> dict[str, dict[str, tuple[float, int, str]]]:
    """``{exercise label: {part: (answer, decimals, what the part asks)}}`` from the ``% check``
    comment lines of the book's solutions (see the module's docstring)."""
    answers: dict[str, dict] = {}
    for path in chapters(root):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            for label, body in _Scan("".join(cell["source"]).splitlines()).solutions:
                for line in body:
                    m = _ANSWER.match(line)
                    if re.match(r"^\s*%\s*check\b", line) and not m:
                        raise ValueError(f"{path.name}, solution {label}: cannot read {line.strip()!r}; write "
                                         "'% check part = value (decimals d): what the part asks'")
                    if m:
                        answers.setdefault(label, {})[m.group(1)] = (float(m.group(2)), int(m.group(3)), m.group(4))
    return answers


def _rounded(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text      # -0.000 is 0.000


def _digest(salt: str, label: str, part: str, value: float, decimals: int) -> str:
    return hashlib.sha256(f"{salt}|{label}|{part}|{_rounded(value, decimals)}".encode()).hexdigest()


def answer_table(answers: dict, *, salt: str) -> dict:
    """The table :func:`grade` checks against, from plain ``answers`` (as :func:`book_answers`
    gives them): ``{label: {part: {"decimals", "about", "sha256"}}}``, the hash of ``salt``, label,
    part and the answer rounded to ``decimals``. Refuses (``ValueError`` naming the answer) an answer
    within 5% of a rounding boundary, where a student's more precise value could round the other way."""
    table = {}
    for label, parts in answers.items():
        for part, (value, decimals, about) in parts.items():
            scaled = value * 10 ** decimals
            if abs(scaled - math.floor(scaled) - 0.5) < 0.05:
                raise ValueError(f"answers[{label!r}][{part!r}] = {value} is too close to a rounding "
                                 f"boundary at {decimals} decimals; give one more decimal")
            table.setdefault(label, {})[part] = {"decimals": decimals, "about": about,
                                                 "sha256": _digest(salt, label, part, value, decimals)}
    return table


def write_answer_table(root=None, path=None) -> Path:
    """Regenerate ``ntklab/_answers.py`` (or ``path``) from the book's solutions (:func:`book_answers`)."""
    from ntklab import _answers

    table = answer_table(book_answers(root), salt=_answers.SALT)
    path = Path(path or Path(__file__).with_name("_answers.py"))
    path.write_text(
        '"""Salted hashes of the answers to the book\'s exercises with a numerical answer (generated by\n'
        "ntklab.student.write_answer_table from the solutions' `% check` lines: do not edit by hand).\"\"\"\n"
        f"SALT = {_answers.SALT!r}\nTABLE = {json.dumps(table, indent=4)}\n", encoding="utf-8")
    return path


def _table() -> dict:
    from ntklab import _answers

    return _answers.TABLE


def grade(label: str, **answers) -> dict[str, bool | None]:
    """``{part: True (right), False (wrong) or None (not answered: None)}`` for the student's
    ``answers`` to exercise ``label``, each compared rounded to the part's decimals.

    Raises ``ValueError`` naming the argument for an exercise without a check, a part the exercise
    does not have, or an answer that is not a finite number."""
    from ntklab import _answers

    table = _table()
    if label not in table:
        raise ValueError(f"label must be an exercise with a numerical answer ({', '.join(sorted(table))}); "
                         f"got {label!r}")
    parts = table[label]
    unknown = sorted(set(answers) - set(parts))
    if unknown:
        raise ValueError(f"{unknown[0]} is not a part of {label}; its parts are {', '.join(parts)}")
    marks = {}
    for part, entry in parts.items():
        value = answers.get(part)
        if value is None:
            marks[part] = None
            continue
        try:
            number = float(value) if not isinstance(value, (bool, str)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{part} must be a finite number (or None), got {value!r}")
        marks[part] = _digest(_answers.SALT, label, part, number, entry["decimals"]) == entry["sha256"]
    return marks


def check_answer(label: str, **answers) -> None:
    """Print, for each part of exercise ``label``, whether the student's answer is right, wrong or
    not given yet, without revealing the answer (see :func:`grade`, which returns the same as a dict)."""
    marks = grade(label, **answers)
    parts = _table()[label]
    for part, mark in marks.items():
        how = f"compared rounded to {parts[part]['decimals']} decimals"
        print(f"{part}: " + ("not answered yet (put your number in place of None)" if mark is None
                             else f"right ({how})" if mark else f"wrong ({how})"))


def _check_cell(label: str, cell_id: str | None) -> dict:
    parts = _table()[label]
    lines = ["# Check your answers to the exercise above: numbers in place of None, then run the cell.",
             "# Each is compared rounded to the decimals given; the check never shows the answer."]
    lines += [f"#   {part}: {e['about']} ({e['decimals']} decimals)" for part, e in parts.items()]
    lines += ["from ntklab.student import check_answer", "",
              f"check_answer({json.dumps(label)}, " + ", ".join(f"{p}=None" for p in parts) + ")"]
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": _source("\n".join(lines))}
    return cell if cell_id is None else {**cell, "id": cell_id}


# ------------------------------------------------------------------ the edition
def _source(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _markdown_cells(cell: dict, checks: dict) -> list[dict]:
    """One markdown cell without its solutions, split after every exercise that has a check, with
    the check's code cell there."""
    scan = _Scan("".join(cell["source"]).splitlines())
    out, chunk, base = [], [], cell.get("id")

    def flush():
        text = "\n".join(chunk).strip("\n")
        if text:
            new = {**cell, "source": _source(text)}
            if base is not None:
                new["id"] = base if not out else f"{base}-{len(out)}"[:64]
            out.append(new)
        chunk.clear()

    for item in scan.lines:
        if isinstance(item, str):
            chunk.append(item)
        elif item[1] in checks:
            flush()
            out.append(_check_cell(item[1], None if base is None else f"check-{item[1]}"[:64]))
    flush()
    return out


def _edition(nb: dict, checks: dict) -> dict:
    """The student edition of one notebook (a new dict; ``nb`` is not changed)."""
    nb = copy.deepcopy(nb)
    ids = nb.get("nbformat", 4) > 4 or nb.get("nbformat_minor", 0) >= 5
    cells = []
    for i, cell in enumerate(nb["cells"]):
        if ids and "id" not in cell:
            cell["id"] = f"cell-{i}"
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            cells += _markdown_cells(cell, checks)
            continue
        if cell["cell_type"] == "code":
            if "remove-cell" in cell.get("metadata", {}).get("tags", []) and _CLAIMS_CHECK.search(source):
                continue
            cell.update(outputs=[], execution_count=None)
            cell["metadata"].pop("execution", None)
        cells.append(cell)
    heading = next((line for c in nb["cells"] if c["cell_type"] == "markdown"
                    for line in "".join(c["source"]).splitlines() if line.startswith("# ")), "# this chapter")
    note = {"cell_type": "markdown", "metadata": {}, "source": _source(NOTE.format(title=heading[2:].strip()))}
    nb["cells"] = [{**note, "id": "student-edition-note"} if ids else note] + cells
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def _check_out(out, sources: list[Path]) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a folder; {out} is a file")
    resolved = out.resolve()
    for folder in {p.parent for p in sources}:
        if resolved == folder or folder in resolved.parents:
            raise ValueError(f"out must not be the book's own folder {folder} (nor inside it): "
                             f"the edition would overwrite or mix with the chapters; got {out}")
    return out


def student_edition(out, *, root=None) -> list[Path]:
    """Write the student edition of the book at ``root`` (default: this package's repository, the
    folder of ``_toc.yml``) to the folder ``out`` (created if needed): every chapter of ``_toc.yml``
    as ``out/<name>.ipynb`` without solutions and claim-asserting cells, outputs cleared, a
    ``check_answer`` cell after each exercise with a numerical answer (see the module's docstring),
    and the :data:`DATA_FILES` the chapters read. Returns the notebooks written, in the toc's order.

    Raises ``ValueError`` naming the argument for a ``root`` without ``_toc.yml``, and for an ``out``
    that is a file or is (or is inside) the book's own folder: the book is never overwritten.
    """
    root = _root(root)
    sources = chapters(root)
    out = _check_out(out, sources)
    checks = _table()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sources:
        nb = _edition(json.loads(path.read_text(encoding="utf-8")), checks)
        target = out / path.name
        target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(target)
    for rel in DATA_FILES:
        if (root / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, out / rel)
    return written


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """``python -m ntklab student-edition OUT [--root DIR]``: exit code 0 on success, 2 for bad
    arguments (an OUT that is a file or the book's folder, a root without ``_toc.yml``), 1 when
    writing fails; errors are one line on stderr."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Write every chapter of the book without the exercises' solutions and "
                               "without the hidden claim checks, outputs cleared, for students; "
                               "exercises with a numerical answer get a check_answer cell.")
    parser.add_argument("out", metavar="OUT", help="folder for the student edition (created if needed)")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help="the book's folder, the one with _toc.yml (default: this ntklab's repository)")
    args = parser.parse_args(argv)
    try:
        written = student_edition(args.out, root=args.root)
    except ValueError as err:
        print(f"ntklab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"ntklab: error: cannot write the student edition: {err}", file=sys.stderr)
        return 1
    print(f"wrote the student edition of {len(written)} chapters to {Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
