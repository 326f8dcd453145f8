"""The instructor's guide, book/instructors.md: it is in the table of contents (back matter, before
the bibliography), it has a section for every chapter of the table of contents, each section names
every exercise of its chapter (so a new exercise without guidance fails here), and every {ref} and
{doc} of the page points at a label or a page of the book that exists (the labels of exercises,
proofs and targets live in the chapters, so a build of the page alone could not check them).

Each check is a function that returns the problems it finds; the tests run it on the book, and on a
copy spoiled on purpose, so that a check which finds nothing cannot pass unnoticed."""
import json
import pathlib
import re

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = "book/instructors"
SECTION = "guide-{}"                        # the MyST target of a chapter's section: (guide-ntk-features)=

DIRECTIVE = re.compile(r"^[ \t]*(`{3,}|:{3,})\{([\w:-]+)\}[^\n]*\n((?:[ \t]*:[\w-]+:[^\n]*\n)*)", re.M)
TARGET = re.compile(r"^\(([^()\s]+)\)=[ \t]*$", re.M)
REF = re.compile(r"\{(?:ref|numref)\}`(?:[^`<]*<)?([^`<>]+?)>?`")
DOC = re.compile(r"\{doc\}`(?:[^`<]*<)?([^`<>]+?)>?`")


def page_text(docname: str) -> str:
    """The markdown of a page of the book: a .md file, or the markdown cells of a notebook."""
    md, nb = ROOT / f"{docname}.md", ROOT / f"{docname}.ipynb"
    if md.exists():
        return md.read_text()
    cells = json.loads(nb.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def toc() -> dict:
    return yaml.safe_load((ROOT / "_toc.yml").read_text())


def toc_pages(toc_dict: dict) -> list[str]:
    return [toc_dict["root"]] + [ch["file"] for part in toc_dict["parts"] for ch in part["chapters"]]


def chapters(toc_dict: dict) -> list[str]:
    """The chapters of the table of contents: its notebooks (the intro, the bibliography and this
    guide are markdown pages)."""
    return [f for f in toc_pages(toc_dict) if (ROOT / f"{f}.ipynb").exists()]


def exercise_labels(markdown: str) -> list:
    """The :label: of every ```{exercise} block, in order (None for an exercise without a label)."""
    labels = []
    for m in DIRECTIVE.finditer(markdown):
        if m.group(2) == "exercise":
            found = re.search(r":label:\s*(\S+)", m.group(3))
            labels.append(found.group(1) if found else None)
    return labels


def defined_labels(markdown: str) -> set:
    """Labels a {ref} can point at: the :label: of any directive and the (name)= targets."""
    labels = set(TARGET.findall(markdown))
    for m in DIRECTIVE.finditer(markdown):
        found = re.search(r":label:\s*(\S+)", m.group(3))
        if found:
            labels.add(found.group(1))
    return labels


def section_of(guide: str, chapter: str) -> str | None:
    """The text of the guide's section for ``chapter`` (book/<stem>): from its (guide-<stem>)= target,
    which must head a '## ' section, to the next target of a '## ' section; None when there is none."""
    name = SECTION.format(pathlib.PurePosixPath(chapter).name.replace("_", "-"))
    start = re.search(rf"^\({re.escape(name)}\)=[ \t]*\n## ", guide, re.M)
    if not start:
        return None
    rest = guide[start.end():]
    end = re.search(r"^\([^()\s]+\)=[ \t]*\n## ", rest, re.M)
    return rest[: end.start()] if end else rest


def missing_sections(guide: str, chapter_list: list[str]) -> list[str]:
    return [ch for ch in chapter_list if section_of(guide, ch) is None]


def missing_guidance(guide: str, exercises: dict) -> list[str]:
    """``chapter: label`` for every exercise of ``exercises`` ({chapter: [labels]}) whose label is
    not referenced with {ref} in that chapter's section of the guide (or that has no label)."""
    problems = []
    for chapter, labels in exercises.items():
        section = section_of(guide, chapter) or ""
        referenced = set(REF.findall(section))
        problems += [f"{chapter}: {label}" for label in labels if label is None or label not in referenced]
    return problems


def unresolved(guide: str, labels: set, pages: set) -> list[str]:
    """The {ref} targets of the guide that are not among ``labels`` and the {doc} targets (relative to
    book/) that are not among ``pages``."""
    bad = [f"ref {r}" for r in REF.findall(guide) if r not in labels]
    bad += [f"doc {d}" for d in DOC.findall(guide)
            if (d[1:] if d.startswith("/") else f"book/{d}") not in pages]
    return bad


def book_pages() -> set:
    return {p.relative_to(ROOT).with_suffix("").as_posix()
            for p in list((ROOT / "book").glob("*.md")) + list((ROOT / "book").glob("*.ipynb"))}


def book_labels() -> set:
    return set().union(*(defined_labels(page_text(p)) for p in book_pages()))


def chapter_exercises(toc_dict: dict) -> dict:
    return {ch: exercise_labels(page_text(ch)) for ch in chapters(toc_dict)}


# ------------------------------------------------------------------------------------------ the book
def test_the_guide_is_in_the_back_matter_before_the_bibliography():
    parts = {part.get("caption"): [ch["file"] for ch in part["chapters"]] for part in toc()["parts"]}
    back = parts.get("Back matter", [])
    assert GUIDE in back, f"{GUIDE} is not in the Back matter part of _toc.yml"
    assert back.index(GUIDE) < back.index("book/bibliography"), "the guide comes before the bibliography"
    assert (ROOT / f"{GUIDE}.md").exists()


def test_every_chapter_has_a_section():
    assert len(chapters(toc())) >= 8, chapters(toc())
    assert missing_sections(page_text(GUIDE), chapters(toc())) == []


def test_every_exercise_of_the_book_has_guidance_in_its_chapters_section():
    exercises = chapter_exercises(toc())
    assert sum(len(v) for v in exercises.values()) >= 20, "the exercise pattern found too few exercises"
    assert missing_guidance(page_text(GUIDE), exercises) == []


def test_every_exercise_label_is_unique():
    labels = [label for v in chapter_exercises(toc()).values() for label in v]
    assert len(labels) == len(set(labels)), sorted(label for label in labels if labels.count(label) > 1)


def test_every_ref_and_doc_of_the_guide_resolves():
    guide = page_text(GUIDE)
    assert len(REF.findall(guide)) >= 20 and DOC.findall(guide), "the patterns found no references"
    assert unresolved(guide, book_labels(), book_pages()) == []


# ------------------------------------------------------------------- the checks fail when they should
def test_the_checks_find_a_missing_exercise_section_and_reference():
    guide = page_text(GUIDE)
    exercises = chapter_exercises(toc())
    chapter, labels = next((c, v) for c, v in exercises.items() if v)
    assert missing_guidance(guide, {**exercises, chapter: labels + ["ex-added-later"]}) == \
        [f"{chapter}: ex-added-later"]
    assert missing_guidance(guide, {chapter: [None]}) == [f"{chapter}: None"]
    spoiled = guide.replace(f"{{ref}}`{labels[0]}`", "the first exercise")
    assert f"{chapter}: {labels[0]}" in missing_guidance(spoiled, exercises)
    # guidance for an exercise in another chapter's section does not count
    other = next(c for c in exercises if c != chapter)
    assert missing_guidance(guide, {other: [labels[0]]}) == [f"{other}: {labels[0]}"]
    assert missing_sections(guide, chapters(toc()) + ["book/new_chapter"]) == ["book/new_chapter"]
    assert unresolved(guide + "\n{ref}`no-such-label` {doc}`no_such_page`\n", book_labels(), book_pages()) == \
        ["ref no-such-label", "doc no_such_page"]


def test_the_parsers_on_a_small_example():
    text = ("(a-target)=\n## Head\n\n```{exercise}\n:label: ex-one\n\nText\n```\n\n"
            "```{exercise}\n:class: x\n\nNo label\n```\n\n```{prf:theorem} T\n:label: thm-x\n```\n"
            "{ref}`ex-one`, {ref}`the theorem <thm-x>`, {numref}`a-target`\n")
    assert exercise_labels(text) == ["ex-one", None]
    assert defined_labels(text) == {"a-target", "ex-one", "thm-x"}
    assert REF.findall(text) == ["ex-one", "thm-x", "a-target"]
