"""The book's repository and launch buttons come from one setting, empty by default (ntklab._book)."""
import pathlib
import re

import pytest
import yaml

from ntklab import _book

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_setting_no_button_and_no_repository():
    options = {"repository_url": "https://github.com/ghost/repo", "use_repository_button": True,
               "launch_buttons": {"colab_url": "https://colab.research.google.com"}, "home_page_in_toc": True}
    out = _book.theme_links("  ", options)
    assert "repository_url" not in out and "launch_buttons" not in out
    assert out["use_repository_button"] is False and out["use_issues_button"] is False
    assert out["home_page_in_toc"] is True           # other options kept
    assert options["use_repository_button"] is True  # the input is not changed


def test_a_url_turns_on_every_link_from_it():
    out = _book.theme_links("https://github.com/someone/ntklab/", {"repository_branch": "master"})
    assert out["repository_url"] == "https://github.com/someone/ntklab"
    assert out["use_repository_button"] and out["use_issues_button"]
    assert out["launch_buttons"]["binderhub_url"] and out["launch_buttons"]["colab_url"]
    assert out["repository_branch"] == "main" and out["path_to_docs"] == ""   # not jupyter-book's defaults


@pytest.mark.parametrize("bad", ["github.com/a/b", "https://github.com/a", "http://github.com/a/b",
                                 "https://github.com/a/b/c"])
def test_a_url_that_is_not_a_repository_names_the_setting(bad):
    with pytest.raises(ValueError, match="ntklab_repository_url"):
        _book.theme_links(bad, {})


def test_the_book_config_uses_the_one_setting_and_it_is_empty():
    text = (ROOT / "_config.yml").read_text()
    config = yaml.safe_load(text)
    assert config["sphinx"]["config"][_book.SETTING] == ""
    assert "ntklab._book" in config["sphinx"]["extra_extensions"]
    assert "repository" not in config and "launch_buttons" not in config
    assert not re.search(r"https?://(github|gitlab|bitbucket)\.\w+/[^<\s]", text), "a hard-coded repository link"
