"""Serving: what the daemon's socket costs, and how fast the portable executor
decodes, each against a baseline measured in the same run.

1. Transport overhead. The same converted model, prompt and greedy settings,
   run N times (a) by calling the engine in-process and (b) through a real
   daemon (subprocess, temp home) over its ipc socket with the wire protocol.
   Reported: time to first token and decode tokens/s, medians, and the
   daemon/in-process ratios. Targets: under 2 ms added to time to first token,
   under 5% lost on tokens/s, judged on the daemon's default settings (token
   events at most every 20 ms, ``stream_interval_seconds``). A third row,
   informational, runs a second daemon with one event per token
   (``stream_interval_seconds = 0``): every event wakes threads that, with no
   idle core, run in the model's place. Two more rows go through the same
   daemon's HTTP APIs (httpx, one kept-alive connection): OpenAI's
   ``/v1/completions`` streamed as Server-Sent Events, and Ollama's
   ``/api/generate`` (``raw``) streamed as NDJSON, whose final object carries
   the engine's prefill time (``prompt_eval_duration``) for the time to first
   token outside the prefill. Targets for HTTP: under 3 ms added to time to
   first token and under 3% lost on tokens/s.
   The daemon runs each model in a worker process (anemlld/worker.py). Two
   rows isolate that hop without the socket: the service layer in this
   process with the model on a thread here (informational: how the daemon
   ran models before) and with the model in a worker process. Target for the
   hop (worker against thread, paired): under 1 ms added to time to first
   token and under 2% lost on tokens/s.
2. The portable executor's decode tokens/s against transformers' own
   ``generate`` (fp32, greedy, KV cache) on the same model.

    .venv/bin/python bench/serving.py [--model DIR] [--runs N] [--max-tokens N]

The model defaults to the demo model (examples/pico-llama), converted first
with LUT 4 FFN / LUT 6 head. Both sides use one torch thread, as the portable
executor does by default.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, print_header, table

PROMPT = "The shell reads a line of input, splits it into words, and looks up the first word as"


class InProcess:
    def __init__(self, model_dir: Path):
        from anemlld.runtime.engine import Engine

        self.engine = Engine(model_dir, executor="portable")

    def run(self, max_tokens: int) -> tuple[float, float, int, dict]:
        from anemlld.runtime.engine import Done, Token
        from anemlld.runtime.sampling import SamplingParams

        t0 = time.perf_counter()
        first = end = None
        for ev in self.engine.generate(prompt=PROMPT, params=SamplingParams(max_tokens=max_tokens)):
            if isinstance(ev, Token) and first is None:
                first = time.perf_counter()
            if isinstance(ev, Done):
                end, n, stats = time.perf_counter(), ev.stats.completion_tokens, ev.stats
        return (first - t0) * 1000, (n - 1) / (end - first), n, {"prefill_ms": stats.prefill_ms}


class ThroughService:
    """The service layer (anemlld/service.py) in this process, as the transports
    call it, with the model on a thread here (``loader``: the in-process
    engine) or in a worker process (no loader, the daemon's default)."""

    def __init__(self, model_dir: Path, home: Path, in_process: bool):
        import dataclasses

        from anemlld.registry import Registry
        from anemlld.residency import Residency, engine_loader
        from anemlld.service import Service
        from shared.settings import Settings

        home.mkdir(parents=True)
        settings = dataclasses.replace(Settings.load(home=home), prefix_cache_states=0, memory_budget=0)
        registry = Registry()
        registry.upsert("bench", state="ready", path=str(model_dir), size_bytes=1)
        loader = (lambda entry, progress=None: _portable(entry.path)) if in_process else None
        self.residency = Residency(settings, registry, loader)
        self.service = Service(settings, registry, self.residency)
        t0 = time.perf_counter()
        self.residency.acquire("bench", keep_alive=3600)
        self.load_ms = (time.perf_counter() - t0) * 1000

    def run(self, max_tokens: int) -> tuple[float, float, int, dict]:
        import threading

        from shared import protocol

        times: list[float] = []
        finished = threading.Event()
        out: dict = {}

        class Sink:
            def progress(self, part, fraction): pass
            def token(self, text, token_ids): times.append(time.perf_counter())
            def done(self, fields): out.update(fields, end=time.perf_counter()); finished.set()
            def error(self, error): out.update(error=error); finished.set()
        t0 = time.perf_counter()
        self.service.generate(protocol.Generate(id="b", model="bench", prompt=PROMPT, max_tokens=max_tokens,
                                                temperature=0.0), Sink())
        finished.wait()
        if "error" in out:
            raise RuntimeError(f"the service answered {out['error']}")
        n = out["completion_tokens"]
        return (times[0] - t0) * 1000, (n - 1) / (out["end"] - times[0]), n, out

    def memory_bytes(self) -> int | None:
        return (self.residency.ps() or [{}])[0].get("memory_bytes")

    def close(self) -> None:
        self.residency.stop()


def _portable(path: str):
    from anemlld.runtime.engine import Engine

    return Engine(path, executor="portable")


class ThroughDaemon:
    """A real daemon (subprocess, temp home) serving the converted folder,
    dropped into its drop folder (a converted folder is served as it is)."""

    def __init__(self, model_dir: Path, home: Path, stream_interval: float | None = None):
        import shutil

        import zmq

        from shared import protocol
        from shared.settings import Settings

        self.protocol = protocol
        home.mkdir(parents=True)
        extra = "" if stream_interval is None else f"stream_interval_seconds = {stream_interval}\n"
        # No prefix cache: every run repeats the prompt, which would come from the
        # cache and leave the in-process baseline (a fresh state each run) behind.
        (home / "settings.toml").write_text("settle_seconds = 0.2\nrescan_seconds = 5\nprefix_cache_states = 0\n"
                                            + extra + '[http]\nbind = "127.0.0.1:0"\n')
        self.home = home
        settings = Settings.load(home=home)
        settings.make_dirs()
        shutil.copytree(model_dir, settings.drop_dir / "bench")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = open(home / "daemon.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "anemlld", "--home", str(home)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.ids = iter(range(1, 10**9))
        deadline = time.monotonic() + 60
        while not settings.socket_path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((home / "daemon.log").read_text()[-2000:])
            time.sleep(0.1)
        self.sock.connect(settings.endpoint)
        while True:
            models = {m["name"]: m for m in self.call(protocol.Models)[-1][1].data["models"]}
            if models.get("bench", {}).get("state") in ("ready", "loaded"):
                break
            time.sleep(0.2)
        self.call(protocol.Load, model="bench", keep_alive="30m")
        self.http_url = self.call(protocol.Hello)[-1][1].data["http"]

    def call(self, op, **fields):
        rid = f"b{next(self.ids)}"
        t0 = time.perf_counter()
        self.sock.send(self.protocol.encode_request(op(id=rid, **fields)))
        events = []
        while True:
            if not self.sock.poll(300_000):
                raise TimeoutError(f"no answer; daemon log: {(self.home / 'daemon.log').read_text()[-2000:]}")
            ev = self.protocol.decode_event(self.sock.recv())
            events.append((time.perf_counter() - t0, ev))
            if ev.final and ev.id == rid:
                return events

    def run(self, max_tokens: int) -> tuple[float, float, int, dict]:
        events = self.call(self.protocol.Generate, model="bench", prompt=PROMPT, max_tokens=max_tokens,
                           temperature=0.0)
        tokens = [t for t, e in events if e.event == "token"]
        done = events[-1][1]
        if done.event != "done":
            raise RuntimeError(f"daemon answered {done.event}: {done.data}")
        n = done.data["completion_tokens"]
        return tokens[0] * 1000, (n - 1) / (events[-1][0] - tokens[0]), n, done.data

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.wait(20)


class ThroughHttp:
    """The same daemon over HTTP: OpenAI SSE or Ollama NDJSON, streamed."""

    def __init__(self, daemon: ThroughDaemon, dialect: str):
        import httpx

        self.dialect = dialect
        self.client = httpx.Client(base_url=daemon.http_url, timeout=300)

    def run(self, max_tokens: int) -> tuple[float, float, int, dict]:
        import json

        if self.dialect == "openai":
            path, body = "/v1/completions", {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens,
                                             "temperature": 0, "stream": True,
                                             "stream_options": {"include_usage": True}}
        else:
            path, body = "/api/generate", {"model": "bench", "prompt": PROMPT, "raw": True,
                                           "options": {"num_predict": max_tokens, "temperature": 0}}
        t0 = time.perf_counter()
        first = end = None
        done: dict = {}
        with self.client.stream("POST", path, json=body) as r:
            for line in r.iter_lines():
                if self.dialect == "openai":
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    has_text = bool(obj["choices"] and obj["choices"][0]["text"])
                    if obj.get("usage"):
                        done = {"completion_tokens": obj["usage"]["completion_tokens"]}
                else:
                    obj = json.loads(line)
                    has_text = bool(obj.get("response"))
                    if obj.get("done"):
                        done = {"completion_tokens": obj["eval_count"], "prefill_ms": obj["prompt_eval_duration"] / 1e6}
                if has_text:
                    end = time.perf_counter()
                    first = first or end
        n = done["completion_tokens"]
        return (first - t0) * 1000, (n - 1) / (end - first), n, done

    def close(self) -> None:
        self.client.close()


def hf_generate(hf_dir: Path, model_dir: Path, runs: int, max_tokens: int) -> tuple[list[float], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    rates, counts = [], []
    for _ in range(runs + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            # time to first token: one prefill forward, measured separately
            t1 = time.perf_counter()
            model(ids)
            t2 = time.perf_counter()
        n = out.shape[1] - ids.shape[1]
        rates.append((n - 1) / max((t1 - t0) - (t2 - t1), 1e-9))
        counts.append(n)
    return rates[1:], counts[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a converted model folder (default: convert the demo model)")
    ap.add_argument("--source", type=Path, default=REPO / "examples" / "pico-llama",
                    help="the Hugging Face folder (for the transformers baseline)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ns = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print_header("serving: daemon socket and HTTP vs in-process, portable executor vs transformers")
    with tempfile.TemporaryDirectory() as tmp:
        model = ns.model
        if model is None:
            from anemlld.convert.pipeline import convert
            from shared.options import ConvertOptions

            model = Path(tmp) / "pico-ane"
            convert(ns.source, model, ConvertOptions(lut_ffn=4, lut_lm_head=6))
        # Interleaved, so that load from anything else on the machine hits every path alike.
        t0 = time.perf_counter()
        local = InProcess(model)
        local_load_ms = (time.perf_counter() - t0) * 1000
        threaded = ThroughService(model, Path(tmp) / "home-thread", in_process=True)
        worker = ThroughService(model, Path(tmp) / "home-worker", in_process=False)
        worker_memory = worker.memory_bytes()
        daemon = ThroughDaemon(model, Path(tmp) / "home")
        per_token = ThroughDaemon(model, Path(tmp) / "home-per-token", stream_interval=0)
        sse, ndjson = ThroughHttp(daemon, "openai"), ThroughHttp(daemon, "ollama")
        a, b, c, d, e, f, g = [], [], [], [], [], [], []
        try:
            for i in range(ns.runs + 1):
                paths = [(local, a), (daemon, b), (per_token, c), (sse, d), (ndjson, e), (threaded, f), (worker, g)]
                k = i % len(paths)
                for path, results in paths[k:] + paths[:k]:  # each path takes each place in turn
                    r = path.run(ns.max_tokens)
                    if i:  # the first round warms caches and is dropped
                        results.append(r)
        finally:
            threaded.close()
            worker.close()
            sse.close()
            ndjson.close()
            daemon.close()
            per_token.close()
        a_ttft, a_rate, a_n, a_done = zip(*a)
        b_ttft, b_rate, b_n, b_done = zip(*b)
        c_ttft, c_rate, _, c_done = zip(*c)
        d_ttft, d_rate, _, _ = zip(*d)
        e_ttft, e_rate, _, e_done = zip(*e)
        f_ttft, f_rate, _, f_done = zip(*f)
        g_ttft, g_rate, _, g_done = zip(*g)
        inner_ttft = [t - d["prefill_ms"] for t, d in zip(b_ttft, b_done)]
        inner_rate = [r / d["tokens_per_s"] for r, d in zip(b_rate, b_done)]
        h_rate, h_n = hf_generate(ns.source, model, ns.runs, ns.max_tokens)

    med = statistics.median
    print(f"{ns.runs} runs each (after one warm-up), prompt of {len(PROMPT.split())} words, greedy, "
          f"up to {ns.max_tokens} tokens (generated: in-process {med(a_n)}, daemon {med(b_n)}, "
          f"transformers {med(h_n)})\n")
    def paired(ttft: tuple, rate: tuple) -> tuple[float, float]:
        """Medians over rounds of (this path - in-process) TTFT and this
        path's tok/s over in-process: each round's runs are back to back, so
        the machine's drift (this VM's speed wanders by 10-30% over minutes)
        cancels, which a difference of medians does not do."""
        return (med(t - u for t, u in zip(ttft, a_ttft)), med(r / s for r, s in zip(rate, a_rate)))

    def outside_prefill(ttft: tuple, done: tuple) -> float:
        """Median over rounds of the time to first token spent outside the
        engine's prefill (tokenizing, sampling, and through the daemon the
        socket, protocol and thread hand-overs), this path minus in-process:
        the transport's cost without the noise of the prefill computation."""
        return med((t - d["prefill_ms"]) - (u - e["prefill_ms"])
                   for t, d, u, e in zip(ttft, done, a_ttft, a_done))

    (b_dt, b_r), (c_dt, c_r) = paired(b_ttft, b_rate), paired(c_ttft, c_rate)
    (d_dt, d_r), (e_dt, e_r) = paired(d_ttft, d_rate), paired(e_ttft, e_rate)
    b_out, c_out = outside_prefill(b_ttft, b_done), outside_prefill(c_ttft, c_done)
    e_out = outside_prefill(e_ttft, e_done)
    (f_dt, f_r), (g_dt, g_r) = paired(f_ttft, f_rate), paired(g_ttft, g_rate)
    f_out, g_out = outside_prefill(f_ttft, f_done), outside_prefill(g_ttft, g_done)
    # the hop alone: worker against thread, paired by round
    hop_dt = med(t - u for t, u in zip(g_ttft, f_ttft))
    hop_out = med((t - d["prefill_ms"]) - (u - e["prefill_ms"]) for t, d, u, e in zip(g_ttft, g_done, f_ttft, f_done))
    hop_r = med(r / s for r, s in zip(g_rate, f_rate))
    rows = [
        ["in-process engine (baseline)", f"{med(a_ttft):.2f}", f"{med(a_rate):.1f}", "", "", ""],
        ["through the daemon socket (default settings)", f"{med(b_ttft):.2f}", f"{med(b_rate):.1f}",
         f"{b_dt:+.2f}", f"{b_out:+.2f}", f"{(b_r - 1) * 100:+.1f}%"],
        ["  same, one event per token", f"{med(c_ttft):.2f}", f"{med(c_rate):.1f}",
         f"{c_dt:+.2f}", f"{c_out:+.2f}", f"{(c_r - 1) * 100:+.1f}%"],
        ["service, model on a thread here (informational)", f"{med(f_ttft):.2f}", f"{med(f_rate):.1f}",
         f"{f_dt:+.2f}", f"{f_out:+.2f}", f"{(f_r - 1) * 100:+.1f}%"],
        ["service, model in a worker process", f"{med(g_ttft):.2f}", f"{med(g_rate):.1f}",
         f"{g_dt:+.2f}", f"{g_out:+.2f}", f"{(g_r - 1) * 100:+.1f}%"],
        ["HTTP, OpenAI /v1/completions (SSE)", f"{med(d_ttft):.2f}", f"{med(d_rate):.1f}",
         f"{d_dt:+.2f}", "", f"{(d_r - 1) * 100:+.1f}%"],
        ["HTTP, Ollama /api/generate (NDJSON)", f"{med(e_ttft):.2f}", f"{med(e_rate):.1f}",
         f"{e_dt:+.2f}", f"{e_out:+.2f}", f"{(e_r - 1) * 100:+.1f}%"],
    ]
    print(table(rows, ["path", "TTFT ms", "decode tok/s", "TTFT added ms*", "outside prefill ms**",
                       "tok/s change*"]))
    print("* paired: median over rounds of the difference (ratio) to the in-process run of the same round")
    print("** the same for time to first token minus the engine's own prefill time: the socket's cost")
    print(f"\nwithin the same daemon requests: client TTFT minus the daemon engine's own prefill time "
          f"{med(inner_ttft):.2f} ms; client tok/s over the daemon engine's own {med(inner_rate):.3f}x "
          f"(the engine's decode time includes sending the token events)")
    print(f"\ntargets (default settings, paired): TTFT added < 2 ms: {'met' if b_dt < 2 else 'MISSED'} "
          f"(outside the prefill: {'met' if b_out < 2 else 'MISSED'}); "
          f"tok/s loss < 5%: {'met' if b_r >= 0.95 else 'MISSED'}")
    print(f"the worker hop (worker against thread, paired): TTFT {hop_dt:+.2f} ms (outside the prefill "
          f"{hop_out:+.2f} ms), tok/s {(hop_r - 1) * 100:+.1f}%; targets < 1 ms: "
          f"{'met' if hop_dt < 1 else 'MISSED'} (outside the prefill: {'met' if hop_out < 1 else 'MISSED'}), "
          f"tok/s loss < 2%: {'met' if hop_r >= 0.98 else 'MISSED'}")
    print(f"engine prefill, medians: thread {med(d['prefill_ms'] for d in f_done):.2f} ms, worker "
          f"{med(d['prefill_ms'] for d in g_done):.2f} ms (the rest of TTFT is the hop's)")
    print(f"load: in-process engine {local_load_ms:.0f} ms (torch imported), model on a thread "
          f"{threaded.load_ms:.0f} ms, worker process {worker.load_ms:.0f} ms (spawn, imports, load); "
          f"worker memory {worker_memory / (1 << 20):.0f} MB" if worker_memory else "worker memory unknown")
    print(f"targets for HTTP (paired): TTFT added < 3 ms: SSE {'met' if d_dt < 3 else 'MISSED'}, NDJSON "
          f"{'met' if e_dt < 3 else 'MISSED'} (outside the prefill: {'met' if e_out < 3 else 'MISSED'}); "
          f"tok/s loss < 3%: SSE {'met' if d_r >= 0.97 else 'MISSED'}, NDJSON "
          f"{'met' if e_r >= 0.97 else 'MISSED'}\n")
    rows = [["transformers generate, fp32 (baseline)", f"{med(h_rate):.1f}", "1.00x"],
            ["portable executor, converted LUT4/6, fp16", f"{med(a_rate):.1f}", f"{med(a_rate) / med(h_rate):.2f}x"]]
    print(table(rows, ["decoder", "decode tok/s", "ratio"]))


if __name__ == "__main__":
    main()
