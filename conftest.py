"""Settings for the whole test run, unit tests and the chapter notebooks that nbval executes.

The notebooks' kernels inherit this process's environment, so progress bars are switched off here
for them: nbval reads a cell's messages only after the cell has finished, and a long fresh
computation that draws many bar updates overflows the kernel's message queue (see
``ntklab._progress``). ``NTKLAB_PROGRESS=1 pytest`` keeps the bars.
"""
import os

os.environ.setdefault("NTKLAB_PROGRESS", "0")
