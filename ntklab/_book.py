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
