"""Executors: the one interface the engine runs converted parts through.

``coreml`` runs compiled models on the Neural Engine (macOS only);
``portable`` runs the very same ``.mlpackage`` files anywhere through our MIL
executor. Both expose: make a state, embed token ids, run the FFN chunks
(function ``infer`` or ``prefill``) over the shared state, and turn a hidden
state into logits (the split LM head concatenated) or straight into the
greedy token (the head's ``argmax`` function, or an argmax-only head). A
monolithic model's one package stands for all of them: ``embed`` passes the
token ids through, ``ffn`` runs the package and returns its outputs, which
``logits`` and ``argmax`` read.
"""
from __future__ import annotations

import logging
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from anemlld.layout import Layout
from shared.errors import AnemllError
from shared.settings import env_count

log = logging.getLogger(__name__)

INFER, PREFILL = "infer", "prefill"
INFER_ROTATE = "infer_rotate"  # ANEMLL's Gemma 3 past its window (runtime/rotation.py)
ARGMAX = "argmax"  # the LM head's second function, when it has one
Progress = Callable[[str, float], None]  # (part file name, fraction of the parts loaded)


class Executor:
    """Base: the parts of one converted model and how to call them."""

    name = "base"

    def __init__(self, layout: Layout):
        self.layout = layout
        self.split = layout.split_lm_head
        self.load_ms = 0.0
        self.predictions = 0  # model calls so far (the engine counts them per token)
        # Where each LM-head split starts in the vocabulary.
        self._offsets = np.cumsum([0] + layout.lm_head_chunk_sizes[:-1]) if (
            layout.argmax_only or layout.head_argmax_function) else None

    @property
    def has_argmax(self) -> bool:
        """Whether the head can return the greedy token without the logits."""
        return self._offsets is not None

    def _logits_or_refuse(self) -> None:
        if self.layout.argmax_only:
            raise AnemllError(f"{self.layout.root.name}'s LM head returns only its argmax (ANEMLL's --argmax), "
                              "not logits", "decode greedily, or re-convert the model without --argmax",
                              stage="predict", code="bad_request")

    def _token(self, indices: np.ndarray, values: np.ndarray) -> int:
        """The vocabulary id of the best split's winner (the first on ties, as
        argmax over the concatenated logits)."""
        best = int(np.argmax(np.asarray(values, dtype=np.float32).reshape(-1)))
        return int(np.asarray(indices).reshape(-1)[best]) + int(self._offsets[best])

    # The four things the engine needs; subclasses bind the backend.
    def make_state(self) -> Any:
        raise NotImplementedError

    def embed(self, input_ids: np.ndarray) -> Any:
        raise NotImplementedError

    def ffn(self, hidden: Any, step: dict[str, np.ndarray], state: Any, function: str) -> Any:
        """Run every chunk's ``function`` over ``hidden``; ``step`` holds the
        other inputs the chunks declare (``position_ids``, ``causal_mask``,
        ``current_pos``, and for sliding-window layers ``local_mask``,
        ``ring_pos``), as the engine computes them."""
        raise NotImplementedError

    def logits(self, hidden: Any) -> np.ndarray:
        raise NotImplementedError

    def _ffn_inputs(self, hidden, step: dict[str, np.ndarray], function: str) -> dict[str, Any]:
        lay = self.layout
        return _ffn_inputs(hidden, step, "input_ids" if lay.monolithic else "hidden_states",
                           lay.context_length if function == PREFILL and lay.update_mask_prefill else None)

    def argmax(self, hidden: Any) -> int:
        """The greedy token, from as little of the head as it can return."""
        return int(np.argmax(self.logits(hidden)))

    def bind_thread(self) -> None:
        """Called by the engine on the thread about to run the model."""

    def warm_up(self) -> None:
        """One throwaway step on a scratch state: first predictions after a
        load are slow (portable: lazy kernel setup, ~2.5 s measured on pico)
        and on the Neural Engine have been seen to fail."""
        from anemlld.runtime.attention import Steps

        steps = Steps.of(self.layout)
        h = self.embed(np.zeros((1, 1), dtype=np.int32))
        hidden = self.ffn(h, steps.step(0, 1, steps.new_ring()), self.make_state(), INFER)
        if not self.layout.argmax_only:
            self.logits(hidden)
        if self.has_argmax:
            self.argmax(hidden)


MASKS = frozenset({"causal_mask", "local_mask"})


def _ffn_inputs(hidden, step: dict[str, np.ndarray], first: str = "hidden_states",
                update_mask_context: int | None = None) -> dict[str, Any]:
    """The inputs of an FFN chunk, or of a monolithic model (``first`` is then
    ``input_ids``). ANEMLL's older prefill functions also take ``update_mask``
    (1, 1, context, batch): 1 where batch row i is written, at current_pos + i."""
    inputs = {first: hidden}
    for name, value in step.items():
        inputs[name] = np.asarray(value, dtype=np.float16 if name in MASKS else np.int32)
    if update_mask_context is not None:
        rows, pos = len(inputs["position_ids"]), int(inputs["current_pos"][0])
        mask = np.zeros((1, 1, update_mask_context, rows), dtype=np.float16)
        mask[0, 0, pos + np.arange(rows), np.arange(rows)] = 1
        inputs["update_mask"] = mask
    return inputs


class PortableExecutor(Executor):
    """Runs ``.mlpackage`` MIL programs with torch (CPU, or CUDA when present)."""

    name = "portable"

    def __init__(self, layout: Layout, device: str | None = None, warmup: bool = True, threads: int | None = None,
                 progress: Progress | None = None):
        super().__init__(layout)

        from anemlld.runtime.portable import PortableModel

        # Decoding is thousands of small ops. With torch's default two threads
        # on this 2-core machine, any other busy process (a conversion, a test
        # run) makes every op wait for a descheduled thread: pico-llama decoded
        # at 2.1 tok/s with 2 threads against 62 tok/s with 1, both under load
        # (190 vs 196 tok/s idle). One thread unless asked otherwise.
        # torch's thread count is per calling thread (OpenMP), so it is set on
        # every thread that runs the model, not only on the one that loads it.
        self.threads = threads or env_count("ANEMLL_PORTABLE_THREADS", 1)
        self._bound: set[int] = set()
        self.bind_thread()

        t = time.perf_counter()
        paths = layout.parts(".mlpackage")
        compiled = [p.name for p in paths if p.suffix != ".mlpackage"]
        if compiled:
            raise AnemllError(f"{layout.root.name} holds only compiled models ({compiled[0]}, ...)",
                              "the portable executor runs .mlpackage files: run this model on macOS "
                              "(executor coreml), or convert it again from the Hugging Face folder",
                              stage="load", code="model_failed")
        models = []
        for i, path in enumerate(paths):
            if progress:
                progress(path.name, i / len(paths))
            models.append(PortableModel(path, device))
        if layout.monolithic:  # the one model is every part
            self.embeddings = self.head = None
            self.chunks = models
        else:
            self.embeddings, self.chunks, self.head = models[0], models[1:-1], models[-1]
        # a split-rotate folder's prefill functions are in files of their own
        self.prefill_chunks = ([PortableModel(p, device) for p in layout.prefill_chunks(".mlpackage")]
                               if layout.split_rotate else self.chunks)
        self._outputs = [f"logits{i + 1}" for i in range(self.split)]
        self._argmax_fn = ARGMAX if self.layout.head_argmax_function else None  # None: the default
        if warmup:
            self.warm_up()
        self.load_ms = (time.perf_counter() - t) * 1000

    def bind_thread(self) -> None:
        import torch

        me = threading.get_ident()
        if me not in self._bound:
            torch.set_num_threads(self.threads)
            self._bound.add(me)

    def make_state(self):
        return self.chunks[0].make_state()

    def embed(self, input_ids):
        if self.embeddings is None:  # monolithic: the token ids go into the one model
            return input_ids.astype(np.int32)
        self.predictions += 1
        return self.embeddings.predict_tensors({"input_ids": input_ids.astype(np.int32)})["hidden_states"]

    def ffn(self, hidden, step, state, function):
        inputs = self._ffn_inputs(hidden, step, function)
        if self.layout.monolithic:
            self.predictions += 1
            return self.chunks[0].predict_tensors(inputs, state, function)  # the head's outputs
        for chunk in (self.prefill_chunks if function == PREFILL else self.chunks):
            inputs["hidden_states"] = chunk.predict_tensors(inputs, state, function)["output_hidden_states"]
        self.predictions += len(self.chunks)
        return inputs["hidden_states"]

    def _head(self, hidden, function: str | None = None) -> dict:
        if isinstance(hidden, dict):  # a monolithic model's outputs
            return hidden
        self.predictions += 1
        return self.head.predict_tensors({"hidden_states": hidden}, function=function)

    def logits(self, hidden):
        import torch

        self._logits_or_refuse()
        out = self._head(hidden)
        return torch.cat([out[k].reshape(-1) for k in self._outputs]).float().cpu().numpy()

    def argmax(self, hidden):
        if not self.has_argmax:
            return super().argmax(hidden)
        out = self._head(hidden, self._argmax_fn)
        return self._token(out["argmax_idx"].cpu().numpy(), out["argmax_val"].cpu().numpy())


class CoreMLExecutor(Executor):
    """Core ML on the Neural Engine (macOS 15+): compiled ``.mlmodelc`` through
    ``CompiledMLModel`` (or ``.mlpackage`` through ``MLModel``), one model
    object per function, one ``make_state()`` shared by every chunk."""

    name = "coreml"

    def __init__(self, layout: Layout, compute_units: str = "CPU_AND_NE", warmup: bool = True,
                 progress: Progress | None = None):
        super().__init__(layout)
        reason = coreml_unavailable()
        if reason:
            raise AnemllError(f"the coreml executor cannot run here: {reason}",
                              "use the portable executor (executor = \"portable\")", stage="load",
                              code="model_failed")
        import coremltools as ct

        self._units = getattr(ct.ComputeUnit, compute_units)
        t = time.perf_counter()
        paths = layout.parts()
        report = progress or (lambda part, fraction: None)
        if layout.monolithic:  # one model, both functions; no embeddings or head of its own
            report(paths[0].name, 0.0)
            self.embeddings = self.head = self.head_argmax = None
            self.chunks = [{fn: self._load(paths[0], fn) for fn in (INFER, PREFILL)}]
        else:
            report(paths[0].name, 0.0)
            self.embeddings = self._load(paths[0])
            self.chunks = []
            # ANEMLL's Gemma 3 also runs infer_rotate past its window; a
            # split-rotate folder keeps the prefill functions in other files
            infers = (INFER, INFER_ROTATE) if layout.rotation_window else (INFER,)
            for i, (p, pf) in enumerate(zip(paths[1:-1], layout.prefill_chunks()), start=1):
                report(p.name, i / len(paths))
                self.chunks.append({**{fn: self._load(p, fn) for fn in infers}, PREFILL: self._load(pf, PREFILL)})
            report(paths[-1].name, (len(paths) - 1) / len(paths))
            self.head = self._load(paths[-1])
            self.head_argmax = self._load(paths[-1], ARGMAX) if layout.head_argmax_function else self.head
        if warmup:
            self.warm_up()
        self.load_ms = (time.perf_counter() - t) * 1000

    def _load(self, path: Path, function: str | None = None):
        import coremltools as ct

        kw: dict[str, Any] = {"compute_units": self._units}
        if function:
            kw["function_name"] = function
        if path.suffix == ".mlmodelc":
            return ct.models.CompiledMLModel(str(path), **kw)
        return ct.models.MLModel(str(path), **kw)

    def make_state(self):
        return self.chunks[0][INFER].make_state()

    def embed(self, input_ids):
        if self.embeddings is None:  # monolithic: the token ids go into the one model
            return input_ids.astype(np.int32)
        self.predictions += 1
        return self.embeddings.predict({"input_ids": input_ids.astype(np.int32)})["hidden_states"]

    def ffn(self, hidden, step, state, function):
        if self.layout.monolithic:
            self.predictions += 1
            return self.chunks[0][function].predict(self._ffn_inputs(hidden, step, function), state)
        inputs = self._ffn_inputs(np.asarray(hidden, dtype=np.float16), step, function)
        for chunk in self.chunks:
            out = chunk[function].predict(inputs, state)
            inputs["hidden_states"] = out["output_hidden_states"]
        self.predictions += len(self.chunks)
        return inputs["hidden_states"]

    def _head(self, hidden, model) -> dict:
        if isinstance(hidden, dict):  # a monolithic model's outputs
            return hidden
        self.predictions += 1
        return model.predict({"hidden_states": np.asarray(hidden, dtype=np.float16)})

    def logits(self, hidden):
        self._logits_or_refuse()
        out = self._head(hidden, self.head)
        return np.concatenate([np.asarray(out[f"logits{i + 1}"]).reshape(-1) for i in range(self.split)]
                              ).astype(np.float32)

    def argmax(self, hidden):
        if not self.has_argmax:
            return super().argmax(hidden)
        out = self._head(hidden, self.head_argmax)
        return self._token(out["argmax_idx"], out["argmax_val"])


def coreml_unavailable() -> str | None:
    """Why Core ML cannot predict here, or None when it can."""
    if platform.system() != "Darwin":
        return f"Core ML runs models only on macOS (this is {platform.system()})"
    try:
        from coremltools.models import model as ct_model
    except ImportError as e:  # pragma: no cover - coremltools is a dependency
        return f"coremltools is not importable ({e})"
    if getattr(ct_model, "_MLModelProxy", None) is None:
        return "coremltools was installed without its native Core ML bindings"
    return None


EXECUTORS: dict[str, Callable[..., Executor]] = {"portable": PortableExecutor, "coreml": CoreMLExecutor}


def choose(name: str = "auto") -> str:
    """``auto`` is coreml where Core ML can run, portable elsewhere."""
    if name == "auto":
        return "coreml" if coreml_unavailable() is None else "portable"
    if name not in EXECUTORS:
        raise AnemllError(f"unknown executor {name!r}", "use auto, coreml or portable", code="bad_request")
    return name


def load(layout: Layout, name: str = "auto", **kw) -> Executor:
    return EXECUTORS[choose(name)](layout, **kw)
