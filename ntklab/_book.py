"""The built book's links to its source repository, from one setting (a Sphinx extension).

``_config.yml`` sets ``sphinx.config.ntklab_repository_url``, empty by default. Empty: no repository,
issues or launch (Binder, Colab) button appears, so no page links to a repository that does not
exist. A URL (``https://github.com/<owner>/<name>``): the repository and issues buttons and the
Binder and Colab launch buttons on every chapter, all built from that one URL. CONTRIBUTING.md says
how to publish the book with it. Loaded by ``_config.yml`` (``sphinx.extra_extensions``); it needs
nothing from the rest of the package.
"""
from __future__ import annotations

SETTING = "ntklab_repository_url"
#: The launch services the buttons open a chapter in, when a repository is set.
LAUNCH = {"notebook_interface": "classic", "binderhub_url": "https://mybinder.org",
          "colab_url": "https://colab.research.google.com"}
_BUTTONS = ("use_repository_button", "use_issues_button")
#: The branch the launch buttons open.
BRANCH = "main"


def theme_links(url: str, options: dict) -> dict:
    """``options`` (the html theme options) with the repository settings and buttons that ``url``
    calls for: all of them off and no repository URL when ``url`` is empty (or blank); else the URL,
    its :data:`BRANCH` branch, the book at the repository's root, the repository and issues buttons
    and the launch buttons.

    Raises ``ValueError`` naming the setting for a URL that is not an ``https://`` address of a
    repository (``https://host/owner/name``).
    """
    url = (url or "").strip().rstrip("/")
    out = {k: v for k, v in options.items() if k not in ("repository_url", "launch_buttons")}
    if not url:
        out.update({b: False for b in _BUTTONS}, use_edit_page_button=False)
        return out
    parts = url.split("/")
    if not url.startswith("https://") or len(parts) != 5 or not all(parts[2:]):
        raise ValueError(f"{SETTING} must be empty or https://<host>/<owner>/<name>; got {url!r}")
    # jupyter-book's defaults would say branch "master" and its own repository: set all of it here
    out.update({b: True for b in _BUTTONS}, repository_url=url, launch_buttons=dict(LAUNCH),
               repository_branch=BRANCH, path_to_docs="")
    return out


def _apply(app, config) -> None:
    config.html_theme_options = theme_links(getattr(config, SETTING), dict(config.html_theme_options or {}))


def setup(app):
    app.add_config_value(SETTING, "", "html")
    app.connect("config-inited", _apply)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# --- the chapters' prerequisites (the intro's dependency graph) ---
#: The title of the admonition that opens every chapter: what it teaches and what it assumes.
OBJECTIVES_TITLE = "Objectives and prerequisites"
_BEFORE = "**Chapters before this one:**"


def chapters(root) -> list[str]:
    """The chapter notebooks of the book at ``root``, in ``_toc.yml`` order: paths relative to
    ``root`` without suffix (``"book/primer"``), for every entry of the toc (its ``root``, and the
    ``file`` of every part, chapter and section, at any depth) that is an ``.ipynb``."""
    import pathlib

    import yaml

    root = pathlib.Path(root)
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                name = node.get(key)
                if isinstance(name, str):
                    name = name[:-6] if name.endswith(".ipynb") else name
                    if (root / f"{name}.ipynb").is_file() and name not in found:
                        found.append(name)
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return found


def objectives(source: str, *, name: str = "chapter") -> dict:
    """The objectives admonition of a chapter's first markdown cell ``source``: ``{"learn": [...],
    "before": [chapter names from its {doc} references], "maths": str}``. Raises ``ValueError``
    naming ``name`` when the admonition or one of its three parts is missing."""
    import re

    match = re.search(r"```\{admonition\} " + re.escape(OBJECTIVES_TITLE) + r"\n(.*?)\n```", source, flags=re.S)
    if not match:
        raise ValueError(f"{name} does not open with the '{OBJECTIVES_TITLE}' admonition")
    body = match.group(1)
    learn = [line[2:].strip() for line in body.splitlines() if line.startswith("- ")]
    before = [line for line in body.splitlines() if line.startswith(_BEFORE)]
    maths = [line for line in body.splitlines() if line.startswith("**Mathematics:**")]
    if "**After this chapter you can**" not in body or not learn:
        raise ValueError(f"{name}: the admonition lists no objectives ('**After this chapter you can**' and items)")
    if len(before) != 1 or len(maths) != 1:
        raise ValueError(f"{name}: the admonition needs one '{_BEFORE}' line and one '**Mathematics:**' line")
    return {"learn": learn, "before": re.findall(r"\{doc\}`([^`]+)`", before[0]),
            "maths": maths[0].split(":**", 1)[1].strip()}


def book_root(start=None):
    """The folder holding ``_toc.yml``: ``start`` (default: the current folder) or the nearest of its
    parents that has one (a chapter executes in ``book/``). ``ValueError`` if there is none."""
    import pathlib

    start = pathlib.Path(start or pathlib.Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "_toc.yml").is_file():
            return folder
    raise ValueError(f"no _toc.yml in {start} or any folder above it: not inside the book")


def chapter_prerequisites(root=None) -> dict[str, dict]:
    """``{chapter: {"title", "number", "before"}}`` for every chapter notebook of the book at ``root``
    (default: :func:`book_root`; :func:`chapters`), from its objectives admonition (:func:`objectives`); ``before`` holds the
    chapters it names as prerequisites, as names like ``"primer"``. Raises ``ValueError`` for a
    chapter without the admonition, a prerequisite that is not a chapter, or one that comes later
    in the table of contents (the graph must read front to back). Drawn by
    :func:`ntklab.plots.chapter_graph` in the book's introduction."""
    import json
    import pathlib

    root = book_root(root)
    order = [pathlib.PurePosixPath(f).name for f in chapters(root)]
    out = {}
    for number, (name, path) in enumerate(zip(order, chapters(root)), start=1):
        cells = json.loads((root / f"{path}.ipynb").read_text())["cells"]
        first = "".join(cells[0]["source"]) if cells and cells[0]["cell_type"] == "markdown" else ""
        parts = objectives(first, name=f"{name}.ipynb")
        for p in parts["before"]:
            if p not in order:
                raise ValueError(f"{name}.ipynb names {p!r} as a prerequisite, which is not a chapter")
            if order.index(p) >= order.index(name):
                raise ValueError(f"{name}.ipynb names {p!r} as a prerequisite, which comes later in the book")
        title = first.splitlines()[0].lstrip("# ").strip()
        out[name] = {"title": title, "number": number, "before": parts["before"]}
    return out
