"""What every benchmark here prints first (date, machine, versions) and the
small helpers they share. Not a benchmark itself."""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

# coremltools' conversion progress bars would bury the numbers
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def quiet_coremltools():
    """Import coremltools without its Linux 'Failed to load ...' noise."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


def meminfo_gb(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "anemlld/convert",
                                "shared/options.py"], capture_output=True, text=True, timeout=10,
                               check=False).stdout.strip()
        return out.stdout.strip() + (" (anemlld/convert or shared/options.py modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def print_header(title: str, argv: list[str] | None = None) -> None:
    import numpy
    import torch

    ct = quiet_coremltools()
    print(f"== {title} ==")
    print(f"date        {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    print(f"command     {' '.join([Path(sys.executable).name] + (argv if argv is not None else sys.argv))}")
    print(f"machine     {platform.machine()} {platform.system()} {platform.release()}, "
          f"nproc {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), "
          f"RAM {meminfo_gb('MemTotal'):.1f} GB (available {meminfo_gb('MemAvailable'):.1f} GB), "
          f"swap {meminfo_gb('SwapTotal'):.1f} GB")
    print(f"load avg    {load_average()} (1/5/15 min; other jobs on the machine slow every number here)")
    print(f"versions    python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {numpy.__version__}, coremltools {ct.__version__}")
    print(f"repo        {REPO} @ {git_commit()}")
    print()


def table(rows: list[list[str]], header: list[str]) -> str:
    """Plain-text table: numeric columns right-aligned, the others left-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def numeric(i: int) -> bool:
        cells = [str(r[i]).strip().rstrip("x%") for r in rows if str(r[i]).strip()]
        try:
            [float(c) for c in cells]
        except ValueError:
            return False
        return bool(cells)

    right = [numeric(i) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if right[i] else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
