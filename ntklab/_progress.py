"""Progress bars for long work, decided in one place.

Every loop in ``ntklab`` that can take seconds shows a ``tqdm.auto`` bar (a widget in Jupyter, text
elsewhere) when its ``progress`` argument is true. Setting the environment variable
``NTKLAB_PROGRESS=0`` turns all of them off whatever ``progress`` says. The test run sets it for the
notebooks it executes (``conftest.py``): nbval reads a cell's messages only once the cell has finished,
and a kernel's message queue holds about a thousand of them, so a long cell that draws many bar
updates loses its last messages and nbval fails the cell with "Timeout of 5 seconds exceeded waiting
for output" (nbval issues #136 and #231).
"""
import os

ENV = "NTKLAB_PROGRESS"


def shown(progress: bool) -> bool:
    """Whether a bar asked for with ``progress`` is shown: ``progress`` unless ``$NTKLAB_PROGRESS`` is ``0``."""
    return bool(progress) and os.environ.get(ENV, "1").strip() != "0"


def bar(progress: bool, iterable=None, **kw):
    """A ``tqdm.auto`` bar over ``iterable`` (or with ``total=``), silent when :func:`shown` is false.

    Usable as an iterable, as a context manager and through ``update``/``set_postfix`` either way;
    ``kw`` goes to ``tqdm`` (``desc``, ``total``, ``leave``, ``initial``, ...)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not shown(progress), **kw)
