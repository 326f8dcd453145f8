"""ntklab._progress: one switch for every progress bar (NTKLAB_PROGRESS), bars as iterables and
context managers either way."""
import pytest

from ntklab import _progress


@pytest.mark.parametrize("env, progress, shown", [("1", True, True), ("1", False, False), ("0", True, False),
                                                   (" 0 ", True, False), (None, True, True)])
def test_the_switch(monkeypatch, env, progress, shown):
    if env is None:
        monkeypatch.delenv(_progress.ENV, raising=False)
    else:
        monkeypatch.setenv(_progress.ENV, env)
    assert _progress.shown(progress) is shown


def test_bars_pass_items_through_and_stay_silent_when_off(monkeypatch, capsys):
    monkeypatch.setenv(_progress.ENV, "1")
    assert list(_progress.bar(True, range(4), desc="shown")) == [0, 1, 2, 3]
    assert "shown" in capsys.readouterr().err
    monkeypatch.setenv(_progress.ENV, "0")
    assert list(_progress.bar(True, range(4), desc="hidden")) == [0, 1, 2, 3]
    with _progress.bar(True, total=3, desc="hidden") as bar:
        bar.update(2)
        bar.set_postfix(loss="0.1")
    assert capsys.readouterr().err == ""
