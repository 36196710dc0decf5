"""`stagewise report RUN_DIR`: an offline HTML report of a run (loss, LR, stages, mixture, forgetting).

rundata.py reads the run directory (no torch, no matplotlib); plots.py draws the figures
(matplotlib, an optional dependency imported only when a report is written); page.py
assembles index.html beside the PNGs.
"""

from stagewise.report.page import write_report
from stagewise.report.rundata import load_run

__all__ = ["load_run", "write_report"]
