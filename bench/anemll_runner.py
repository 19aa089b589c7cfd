"""ANEMLL's own runner (its ``tests/chat.py``) on the folders we convert.

Only its loading and calling code is under test: Core ML's prediction is
supplied by our portable executor through a stand-in for coremltools'
``MLModel`` / ``CompiledMLModel`` / ``make_state()`` / ``predict(..., state)``
(installed in the child process that runs the runner; nothing else of
coremltools is replaced, so its spec reading, metadata and function-name
checks are the real ones). The stand-in behaves as Core ML does where the
runners depend on it:

- ``MLModel`` (an ``.mlpackage``) refuses an input name the function does
  not declare (coremltools checks that in Python before Core ML sees it: a
  ``KeyError``), and the model's spec, metadata and functions are real;
- ``CompiledMLModel`` (an ``.mlmodelc``) has no spec or metadata and passes
  extra inputs to Core ML, which ignores them (ANEMLL's runners send
  ``update_mask`` to ``infer`` functions that do not declare it, and work on
  their own compiled folders).

This machine cannot compile packages (that needs macOS), so each folder runs
in two forms: ``package``, as we write it here (meta.yaml names
``.mlpackage`` files), and ``compiled``, as we write it on macOS (meta.yaml
names ``.mlmodelc`` files; each is a stand-in directory that the fake
``CompiledMLModel`` runs from the package beside it).

ANEMLL's code is never part of this repository: pass the path of a
``chat.py`` you extracted (e.g. ``git show v0.3.4:tests/chat.py >
/tmp/anemll034/chat.py``). For each layout we write (chunked fp16, the
default LUT 4/6, LUT groups, ``--argmax-in-model``, ``--monolithic``, Gemma 3
with sliding-window rings, Gemma 3 whose window covers the context) the
script converts a folder (or takes it from ``--workdir``), runs the runner
non-interactively with ``--meta FOLDER/meta.yaml --prompt ...`` from an
empty working directory elsewhere, records the tokens it generates, and
compares them with our engine's greedy tokens on the same folder and with
transformers' (fp32) on the original model.

    .venv/bin/python bench/anemll_runner.py /tmp/anemll034/chat.py /tmp/anemll035/chat.py \
        [--layouts chunked,argmax] [--forms package,compiled] [--workdir DIR] [--max-tokens 16]

Output: one row per layout x runner x form: ``runs`` (its main() returned 0
and generated tokens), tokens equal to our engine's and to transformers'
(the leading tokens that agree, of how many), and for a failure the last
line the runner printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import REPO, print_header, table  # noqa: F401 (sets up sys.path)

PROMPT = "What does the tar command do?"
STANDIN = "PORTABLE_STANDIN"  # inside a stand-in .mlmodelc: the package it stands for
PICO = REPO / "examples" / "pico-llama"
PICO_QWEN3 = REPO.parent / "shared" / "models" / "pico-qwen3"  # the project's shared models, when present
# Options per layout: small context and batch so that a prompt fills one
# prefill batch and leaves a remainder (both of the runners' paths run).
SMALL = {"context_length": 256, "batch_size": 16, "chunks": 2}
LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chunked-fp16": ("pico", {**SMALL, "lut_embeddings": "none", "lut_ffn": "none", "lut_lm_head": "none"}),
    "chunked-lut4/6": ("pico", SMALL),
    "lut-groups": ("pico", {**SMALL, "lut_ffn": "4,8", "lut_lm_head": "6,0"}),
    "argmax-in-model": ("pico", {**SMALL, "argmax_in_model": True}),
    "qwen3-lut4/6": ("pico-qwen3", SMALL),  # a head in 16 splits
    "monolithic": ("pico", {"context_length": 256, "batch_size": 16, "monolithic": True}),
    "gemma3-ring": ("gemma3-window4", {"context_length": 64, "batch_size": 16, "lut_embeddings": "none",
                                       "lut_ffn": "none", "lut_lm_head": "none"}),
    "gemma3-full": ("gemma3-window128", {"context_length": 64, "batch_size": 16, "lut_embeddings": "none",
                                         "lut_ffn": "none", "lut_lm_head": "none"}),
}


# --- the stand-in for Core ML (child process) ---------------------------------------------------

def install_portable_coreml() -> None:
    """Replace coremltools' ``MLModel`` and ``CompiledMLModel`` by classes
    whose predictions run on the portable executor."""
    import coremltools as ct
    from coremltools.models import model as ct_model

    from anemlld.runtime.portable import PortableModel
    from shared.errors import AnemllError

    loaded: dict[Path, PortableModel] = {}

    def portable(package: Path) -> PortableModel:
        package = package.resolve()
        if package not in loaded:
            loaded[package] = PortableModel(package)
        return loaded[package]

    def run(model: PortableModel, function: str | None, data: dict, state) -> dict:
        if function not in model.functions:
            function = None  # "main" or "": the package's default
        try:
            return model.predict(dict(data), None if state is None else state.__proxy__, function)
        except AnemllError as e:  # Core ML's errors reach Python as RuntimeError
            raise RuntimeError(f"Core ML prediction failed: {e}") from None

    class MLModel(ct_model.MLModel):
        def __init__(self, model, *args, **kw):
            predicts = not kw.get("skip_model_load")  # as in coremltools, skip_model_load=True: spec only
            kw["skip_model_load"] = True  # coremltools reads the spec as usual; nothing loads into Core ML
            super().__init__(model, *args, **kw)
            self._portable = portable(Path(self.package_path)) if predicts else None

        def predict(self, data, state=None):
            self._verify_input_dict(data)  # coremltools' own check (KeyError for an undeclared input)
            return run(self._portable, self.function_name, data, state)

        def make_state(self):
            return ct_model.MLState(self._portable.make_state())

    class CompiledMLModel:
        def __init__(self, path, compute_units=ct.ComputeUnit.ALL, function_name=None, optimization_hints=None,
                     asset=None):
            marker = Path(path) / STANDIN
            if not marker.is_file():
                raise RuntimeError(f"{path} is not a compiled model (no stand-in here: this machine cannot compile)")
            self.compute_unit, self.function_name = compute_units, function_name or ""
            self._portable = portable(Path(path).parent / marker.read_text().strip())
            if self.function_name and self.function_name not in self._portable.functions:
                raise RuntimeError(f"Error: function_name {self.function_name!r} not found in {path}")

        def predict(self, data, state=None):
            declared = set(self._portable.input_names(self.function_name or None))
            return run(self._portable, self.function_name, {k: v for k, v in data.items() if k in declared}, state)

        def make_state(self):
            return ct_model.MLState(self._portable.make_state())

    ct.models.MLModel = ct_model.MLModel = MLModel
    ct.models.CompiledMLModel = CompiledMLModel


def child(chat_py: Path, folder: Path, prompt: str, max_tokens: int, out: Path) -> None:
    """Run ANEMLL's runner in this process (its working directory is an
    empty folder elsewhere) and write what it generated to ``out``."""
    install_portable_coreml()
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("anemll_chat", chat_py)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    tokens: list[int] = []
    add_token = runner.TokenPrinter.add_token

    def record(self, token_id):
        tokens.append(int(token_id))
        return add_token(self, token_id)

    runner.TokenPrinter.add_token = record
    # the prompt as the runner encodes it (its own call), for the references
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=False, trust_remote_code=True)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    sys.argv = [str(chat_py), "--meta", str(folder / "meta.yaml"), "--prompt", prompt,
                "--max-tokens", str(max_tokens)]
    try:
        rc = runner.main()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    import transformers

    out.write_text(json.dumps({"rc": rc, "tokens": tokens, "prompt_ids": [int(i) for i in ids],
                               "transformers": transformers.__version__}))


# --- folders, references, table (parent) --------------------------------------------------------

def source(kind: str, root: Path) -> Path:
    if kind == "pico":
        return PICO
    if kind == "pico-qwen3":
        if not PICO_QWEN3.is_dir():
            raise SystemExit(f"{PICO_QWEN3} is not here: leave qwen3-lut4/6 out of --layouts")
        return PICO_QWEN3
    from tests.conftest import make_tiny_model

    dest = root / "src" / kind
    if not (dest / "config.json").exists():
        make_tiny_model("gemma3", dest, sliding_window=int(kind.removeprefix("gemma3-window")))
    return dest


def convert(layout: str, root: Path) -> tuple[Path, Path]:
    from anemlld.convert import pipeline
    from shared.options import ConvertOptions

    kind, options = LAYOUTS[layout]
    src = source(kind, root)
    out = root / "converted" / layout.replace("/", "-")
    pipeline.convert(src, out, ConvertOptions.from_mapping(options))
    return src, out


def compiled_form(folder: Path, dest: Path) -> Path:
    """``folder`` as we write it on macOS: meta.yaml names .mlmodelc files,
    here stand-ins for the packages beside them."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    for package in dest.glob("*.mlpackage"):
        standin = package.with_suffix(".mlmodelc")
        standin.mkdir()
        (standin / STANDIN).write_text(package.name)
    meta = dest / "meta.yaml"
    meta.write_text(meta.read_text().replace(".mlpackage", ".mlmodelc"))
    return dest


def run_runner(chat_py: Path, folder: Path, prompt: str, max_tokens: int, log: Path,
               site: Path | None = None) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="anemll-runner-cwd-"))  # not the model's folder, not ours
    out = cwd / "result.json"
    path = ([str(site)] if site else []) + [str(REPO), str(REPO / "bench")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(chat_py),
                               str(folder), "--prompt", prompt, "--max-tokens", str(max_tokens),
                               "--result", str(out)], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=600, check=False)
    result = json.loads(out.read_text()) if out.exists() else {"rc": proc.returncode, "tokens": []}
    shutil.rmtree(cwd, ignore_errors=True)
    result["last_line"] = last_error(log)
    return result


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:160]
    return lines[-1][:160] if lines else ""


def references(src: Path, folder: Path, ids: list[int], max_tokens: int) -> tuple[list[int], list[int], set[int]]:
    from anemlld.runtime.engine import Engine
    from anemlld.runtime.sampling import SamplingParams
    from tests.anemll_folders import hf_greedy

    engine = Engine(folder, executor="portable")
    ours = engine.complete(ids=ids, params=SamplingParams(max_tokens=max_tokens, temperature=0.0)).token_ids
    theirs, _gaps = hf_greedy(src, ids, len(ours) or 1)
    return ours, theirs, set(engine.eos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chat_py", nargs="+", type=Path, help="ANEMLL tests/chat.py files (one per version)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--forms", default="package,compiled")
    ap.add_argument("--workdir", type=Path, help="keep converted folders here (reused when run again)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--runner-site", type=Path,
                    help="put this folder first on the runner's import path (a transformers 4.x installed with pip "
                         "--target: ANEMLL's runners call apply_chat_template(return_tensors='pt') as 4.x answers it)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.chat_py[0].resolve(), args.chat_py[1].resolve(), args.prompt, args.max_tokens, args.result)
        return
    from anemlld.runtime.prefix_cache import common_prefix

    print_header("ANEMLL's runners on our folders (Core ML predictions by the portable executor)")
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="anemll-runner-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for layout in args.layouts.split(","):
        src, folder = convert(layout, root)
        refs: dict[tuple, tuple] = {}
        for chat_py in args.chat_py:
            version = chat_py.resolve().parent.name
            for form in args.forms.split(","):
                target = folder if form == "package" else compiled_form(folder, root / "compiled" / folder.name)
                log = root / "logs" / f"{folder.name}.{version}.{form}.log"
                log.parent.mkdir(exist_ok=True)
                r = run_runner(chat_py.resolve(), target, args.prompt, args.max_tokens, log, args.runner_site)
                got, ids = r["tokens"], r.get("prompt_ids")
                runs = r["rc"] == 0 and bool(got)
                engine_cell = hf_cell = ""
                if runs and ids:
                    key = tuple(ids)
                    if key not in refs:
                        refs[key] = references(src, folder, ids, args.max_tokens)
                    ours, theirs, eos = refs[key]
                    body = got[:-1] if got and got[-1] in eos else got  # the runner prints its stop token
                    n = min(len(body), len(ours))
                    engine_cell = f"{common_prefix(body, ours)}/{n}" + (" equal" if body[:n] == ours[:n] else "")
                    hf_cell = f"{common_prefix(body, theirs)}/{min(len(body), len(theirs))}"
                rows.append([layout, version, form, "yes" if runs else "no", str(len(got)), engine_cell, hf_cell,
                             "" if runs else r["last_line"]])
                print(" | ".join(rows[-1]), flush=True)
    print()
    print(table(rows, ["layout", "runner", "form", "runs", "tokens", "= engine", "= transformers", "failure"]))
    print(f"\nlogs in {root / 'logs'}")


if __name__ == "__main__":
    main()
