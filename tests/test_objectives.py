"""Every chapter opens with its objectives and prerequisites, and the introduction's dependency graph
is drawn from them (ntklab._book, ntklab.plots.chapter_graph)."""
import json
import pathlib

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ntklab import _book, plots  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_chapter_opens_with_objectives_and_prerequisites():
    chapters = _book.chapters(ROOT)
    assert len(chapters) >= 8, chapters
    prereq = _book.chapter_prerequisites(ROOT)
    assert list(prereq) == [pathlib.PurePosixPath(c).name for c in chapters]
    for name, path in zip(prereq, chapters):
        first = "".join(json.loads((ROOT / f"{path}.ipynb").read_text())["cells"][0]["source"])
        parts = _book.objectives(first, name=name)
        assert len(parts["learn"]) >= 2 and parts["maths"], name
        # the admonition comes right after the title: "opens with"
        assert first.splitlines()[2].startswith("```{admonition} " + _book.OBJECTIVES_TITLE), name
    assert prereq["primer"]["before"] == []
    assert all(prereq[n]["before"] for n in list(prereq)[1:]), "every chapter after the primer builds on one"


GOOD = ("# T\n\n```{admonition} Objectives and prerequisites\n:class: tip\n\n**After this chapter you can**\n\n"
        "- do a\n- do b\n\n**Chapters before this one:** {doc}`a`, {doc}`b`.\n\n**Mathematics:** sums.\n```\n")


def test_objectives_parses_and_refuses_what_is_missing():
    assert _book.objectives(GOOD) == {"learn": ["do a", "do b"], "before": ["a", "b"], "maths": "sums."}
    spoiled = {
        "no admonition": GOOD.replace("Objectives and prerequisites", "Objectives"),
        "no items": GOOD.replace("- do a\n- do b\n", ""),
        "no chapters line": GOOD.replace("**Chapters before this one:**", "Before:"),
        "no mathematics": GOOD.replace("**Mathematics:** sums.\n", ""),
    }
    for what, text in spoiled.items():
        with pytest.raises(ValueError, match="x.ipynb"):
            _book.objectives(text, name="x.ipynb")


def _tiny_book(tmp_path, before_of_b):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nparts:\n  - chapters:\n"
                                       "      - file: a\n      - file: b\n")
    for name, before in (("a", "none."), ("b", before_of_b)):
        text = GOOD.replace("{doc}`a`, {doc}`b`.", before).replace("# T", f"# Chapter {name}")
        nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": text.splitlines(True)}],
              "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        (tmp_path / f"{name}.ipynb").write_text(json.dumps(nb))
    return tmp_path


def test_prerequisites_must_be_earlier_chapters(tmp_path):
    ok = _book.chapter_prerequisites(_tiny_book(tmp_path, "{doc}`a`."))
    assert ok == {"a": {"title": "Chapter a", "number": 1, "before": []},
                  "b": {"title": "Chapter b", "number": 2, "before": ["a"]}}
    with pytest.raises(ValueError, match="not a chapter"):
        _book.chapter_prerequisites(_tiny_book(tmp_path, "{doc}`zeta`."))
    with pytest.raises(ValueError, match="comes later"):
        _book.chapter_prerequisites(_tiny_book(tmp_path, "{doc}`b`."))
    with pytest.raises(ValueError, match="_toc.yml"):
        _book.book_root(tmp_path.parent)


def test_book_root_is_found_from_a_chapter_folder():
    assert _book.book_root(ROOT / "book") == ROOT


def _graph(prereq):
    fig, ax = plt.subplots()
    plots.chapter_graph(prereq, ax=ax)
    arrows = [c for c in ax.texts if c.get_text() == "" and getattr(c, "arrow_patch", None) is not None]
    boxes = [c for c in ax.texts if c.get_text()]
    plt.close(fig)
    return boxes, arrows


def test_chapter_graph_draws_the_transitive_reduction():
    p = {"a": {"title": "A: x", "number": 1, "before": []},
         "b": {"title": "B", "number": 2, "before": ["a"]},
         "c": {"title": "C", "number": 3, "before": ["a", "b"]}}      # a -> c is implied by a -> b -> c
    boxes, arrows = _graph(p)
    assert sorted(b.get_text() for b in boxes) == ["1. A", "2. B", "3. C"]
    assert len(arrows) == 2
    p["c"]["before"] = ["a"]                                            # now a -> c is direct
    assert len(_graph(p)[1]) == 2
    p["c"]["before"] = []
    assert len(_graph(p)[1]) == 1
    boxes, arrows = _graph(_book.chapter_prerequisites(ROOT))
    assert len(boxes) == len(_book.chapters(ROOT)) and arrows


def test_chapter_graph_refuses_unknown_prerequisites_and_cycles():
    with pytest.raises(ValueError, match="not among the chapters"):
        _graph({"a": {"title": "A", "number": 1, "before": ["z"]}})
    with pytest.raises(ValueError, match="cycle"):
        _graph({"a": {"title": "A", "number": 1, "before": ["b"]}, "b": {"title": "B", "number": 2, "before": ["a"]}})
