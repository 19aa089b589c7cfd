"""The daemon's own resident memory after a conversion: a real daemon,
a Llama-3.2-1B-shaped folder dropped on it (the one bench/convert_1b.py
writes), its RSS sampled every second while the conversion runs and for
--settle seconds after the job is done, with no model loaded.

The baseline is the same daemon built from --base (a git commit, checked out
into a temporary worktree), where conversions ran inside the daemon process;
both run in this invocation, the baseline first. Also reported: end-to-end
seconds of each conversion (drop to done), whose difference is the cost of
the child process (its interpreter, torch and coremltools imports, the plan
made twice).

Options as in bench/convert_1b.py: LUT 4 FFN / 6 head / none embeddings,
2 chunks, context 512, batch 64. About 5 minutes per daemon on the 2-core
machine, plus writing the model once (reused from --workdir).

Run: .venv/bin/python bench/daemon_memory.py [--base COMMIT] [--workdir DIR] [--layers N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, print_header, table  # noqa: E402
from convert_1b import model_is_ready, write_model  # noqa: E402

sys.path.insert(0, str(REPO))
from shared import protocol  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.daemon_harness import Client  # noqa: E402

GB = 1024 ** 3
SIDECAR = """name = "onebee"
[convert]
context_length = 512
batch_size = 64
chunks = 2
lut_embeddings = "none"
lut_ffn = 4
lut_lm_head = 6
"""


def run_daemon(tree: Path, home: Path, model: Path, settle: float, label: str) -> dict:
    """Start the daemon of ``tree`` on a fresh ``home``, drop a copy of
    ``model`` (hard links: no second 2.5 GB), wait for the job, then sample."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "settings.toml").write_text('settle_seconds = 0.5\nrescan_seconds = 0.5\n')
    settings = Settings.load(home=home)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = open(home / "daemon.stderr", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "anemlld", "--home", str(home)], cwd=tree, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    me = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 60
        while not settings.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        start_rss = me.memory_info().rss
        drop = settings.drop_dir / "onebee-src"
        staging = home / "staging"
        shutil.copytree(model, staging, copy_function=os.link)
        (staging / "anemll.toml").write_text(SIDECAR)
        t0 = time.monotonic()
        staging.rename(drop)
        peak, job = start_rss, None
        with Client(settings, timeout=10) as c:
            while time.monotonic() - t0 < 3600:
                peak = max(peak, me.memory_info().rss)
                job = next((j for j in c.request(protocol.Jobs).data["jobs"]), None)
                if job and job["state"] in ("done", "failed"):
                    break
                time.sleep(1.0)
            seconds = time.monotonic() - t0
            if not job or job["state"] != "done":
                raise SystemExit(f"{label}: the conversion did not finish: {job}")
            after = []
            t1 = time.monotonic()
            while time.monotonic() - t1 < settle:
                after.append(me.memory_info().rss)
                time.sleep(1.0)
            loaded = c.request(protocol.Ps).data["ps"]
        return {"label": label, "start": start_rss, "peak": peak, "settled": after[-1], "seconds": seconds,
                "loaded": [p["name"] for p in loaded]}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="5386800", help="commit of the baseline daemon (conversions in-process)")
    ap.add_argument("--workdir", type=Path, help="where the model goes (default: a new temp dir)")
    ap.add_argument("--settle", type=float, default=60.0, help="seconds to watch after the job is done")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16: the 1B shape)")
    a = ap.parse_args(argv)
    print_header("daemon RSS after a 1B-shaped conversion", argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="anemlld-bench-mem-"))
    model = work / "llama-1b-shaped"
    if not model_is_ready(model, "bf16", a.layers, 128256):
        print(f"writing the model into {model} ...", flush=True)
        write_model(model, "bf16", 0, a.layers, 128256)
    base_tree = work / "base-tree"
    if base_tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), a.base], check=True,
                   capture_output=True)
    try:
        runs = [run_daemon(base_tree, work / "home-base", model, a.settle, f"base {a.base} (in-process)"),
                run_daemon(REPO, work / "home-now", model, a.settle, "now (child process)")]
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    rows = [[r["label"], f"{r['start'] / GB:.3f}", f"{r['peak'] / GB:.2f}", f"{r['settled'] / GB:.3f}",
             f"{r['seconds']:.0f}", ",".join(r["loaded"]) or "-"] for r in runs]
    print(table(rows, ["daemon", "RSS at start GB", "peak RSS GB", f"RSS {a.settle:.0f} s after GB",
                       "drop to done s", "loaded"]))
    base, now = runs
    print(f"RSS after: now / base = {now['settled'] / base['settled']:.3f}; "
          f"conversion time: now / base = {now['seconds'] / base['seconds']:.3f} "
          f"({now['seconds'] - base['seconds']:+.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
