"""Executors: the one interface the engine runs converted parts through.

``coreml`` runs compiled models on the Neural Engine (macOS only);
``portable`` runs the very same ``.mlpackage`` files anywhere through our MIL
executor. Both expose: make a state, embed token ids, run the FFN chunks
(function ``infer`` or ``prefill``) over the shared state, and turn a hidden
state into logits (the split LM head concatenated).
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
Progress = Callable[[str, float], None]  # (part file name, fraction of the parts loaded)


class Executor:
    """Base: the parts of one converted model and how to call them."""

    name = "base"

    def __init__(self, layout: Layout):
        self.layout = layout
        self.split = layout.split_lm_head
        self.load_ms = 0.0

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

    def bind_thread(self) -> None:
        """Called by the engine on the thread about to run the model."""

    def warm_up(self) -> None:
        """One throwaway step on a scratch state: first predictions after a
        load are slow (portable: lazy kernel setup, ~2.5 s measured on pico)
        and on the Neural Engine have been seen to fail."""
        from anemlld.runtime.attention import Steps

        steps = Steps.of(self.layout)
        h = self.embed(np.zeros((1, 1), dtype=np.int32))
        self.logits(self.ffn(h, steps.step(0, 1, steps.new_ring()), self.make_state(), INFER))


MASKS = frozenset({"causal_mask", "local_mask"})


def _ffn_inputs(hidden, step: dict[str, np.ndarray]) -> dict[str, Any]:
    inputs = {"hidden_states": hidden}
    for name, value in step.items():
        inputs[name] = np.asarray(value, dtype=np.float16 if name in MASKS else np.int32)
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
        paths = [layout.part("embeddings", ".mlpackage"), *layout.chunks(".mlpackage"),
                 layout.part("lm_head", ".mlpackage")]
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
        self.embeddings, self.chunks, self.head = models[0], models[1:-1], models[-1]
        self._outputs = [f"logits{i + 1}" for i in range(len(self.head.output_names()))]
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
        return self.embeddings.predict_tensors({"input_ids": input_ids.astype(np.int32)})["hidden_states"]

    def ffn(self, hidden, step, state, function):
        inputs = _ffn_inputs(hidden, step)
        for chunk in self.chunks:
            inputs["hidden_states"] = chunk.predict_tensors(inputs, state, function)["output_hidden_states"]
        return inputs["hidden_states"]

    def logits(self, hidden):
        import torch

        out = self.head.predict_tensors({"hidden_states": hidden})
        return torch.cat([out[k].reshape(-1) for k in self._outputs]).float().cpu().numpy()


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
        paths = [layout.part("embeddings"), *layout.chunks(), layout.part("lm_head")]
        report = progress or (lambda part, fraction: None)
        report(paths[0].name, 0.0)
        self.embeddings = self._load(paths[0])
        self.chunks = []
        for i, p in enumerate(paths[1:-1], start=1):
            report(p.name, i / len(paths))
            self.chunks.append({fn: self._load(p, fn) for fn in (INFER, PREFILL)})
        report(paths[-1].name, (len(paths) - 1) / len(paths))
        self.head = self._load(paths[-1])
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
        return self.embeddings.predict({"input_ids": input_ids.astype(np.int32)})["hidden_states"]

    def ffn(self, hidden, step, state, function):
        inputs = _ffn_inputs(np.asarray(hidden, dtype=np.float16), step)
        for chunk in self.chunks:
            out = chunk[function].predict(inputs, state)
            inputs["hidden_states"] = out["output_hidden_states"]
        return inputs["hidden_states"]

    def logits(self, hidden):
        out = self.head.predict({"hidden_states": np.asarray(hidden, dtype=np.float16)})
        return np.concatenate([np.asarray(out[f"logits{i + 1}"]).reshape(-1) for i in range(self.split)]
                              ).astype(np.float32)


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
