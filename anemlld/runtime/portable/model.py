"""The public model: a package, loaded and run."""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from anemlld.runtime.portable.compiler import ConstKeys, FunctionCompiler, Program, STATE_SLOT
from anemlld.runtime.portable.constants import tensor_of
from anemlld.runtime.portable.registry import StateSpec, Tensor, coremltools_quiet, default_device
from shared.errors import AnemllError

log = logging.getLogger(__name__)


class PortableModel:
    """A Core ML package, executed with torch. For example::

        chunk = PortableModel("llama_FFN_PF_lut4_chunk_01of02.mlpackage")
        state = chunk.make_state()  # shareable with the other chunks
        out = chunk.predict({"hidden_states": h, ...}, state, function="prefill")
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        started = time.perf_counter()
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else default_device()
        ct = coremltools_quiet()
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

        if not self.path.exists():
            raise AnemllError(f"{self.path} does not exist", "check the model folder",
                              stage="runtime", code="bad_input")
        if self.path.suffix == ".mlmodelc":
            raise AnemllError(f"{self.path.name} is compiled; the portable executor reads .mlpackage files",
                              "keep the .mlpackage parts next to the .mlmodelc ones to run them off macOS",
                              stage="runtime", code="unsupported_op")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = ct.utils.load_spec(str(self.path))
            if spec.WhichOneof("Type") != "mlProgram":
                raise AnemllError(f"{self.path.name} is not an ML program",
                                  "the portable executor runs mlprogram packages only",
                                  stage="runtime", code="unsupported_op")
            weights = ct.models.MLModel(str(self.path), skip_model_load=True).weights_dir
            prog = milproto_load(spec, specification_version=spec.specificationVersion,
                                 file_weights_dir=weights)
        desc = spec.description
        io = {f.name: f for f in desc.functions}
        # The program's functions come from a protobuf map (no stable order); the
        # description lists them in the order they were added.
        names = [f.name for f in desc.functions if f.name in prog.functions] or list(prog.functions)
        self._default = desc.defaultFunctionName or ("main" if "main" in names else names[0])
        keys = ConstKeys(spec)
        shared: dict[tuple, Tensor] = {}
        self._programs: dict[str, Program] = {}
        with torch.no_grad():
            for name in names:
                compiler = FunctionCompiler(name, prog.functions[name], io.get(name, desc),
                                             self.device, keys, shared)
                self._programs[name] = compiler.compile()
        self._states = self._collect_states()
        consts = {t.data_ptr(): t for p in self._programs.values() for t in p.template if isinstance(t, Tensor)}
        log.info("loaded %s on %s: functions %s, %d steps, %.1f MB of constants, %.2f s",
                 self.path.name, self.device, names, sum(len(p.steps) for p in self._programs.values()),
                 sum(t.numel() * t.element_size() for t in consts.values()) / 2**20,
                 time.perf_counter() - started)

    # description ---------------------------------------------------------
    @property
    def functions(self) -> list[str]:
        return list(self._programs)

    @property
    def default_function(self) -> str:
        return self._default

    def input_names(self, function: str | None = None) -> list[str]:
        return [i.name for i in self._program(function).inputs]

    def output_names(self, function: str | None = None) -> list[str]:
        return [name for name, _ in self._program(function).outputs]

    def state_specs(self, function: str | None = None) -> list[StateSpec]:
        return list(self._program(function).states)

    def op_types(self, function: str | None = None) -> list[str]:
        """The op types that run per call (after folding constants)."""
        return sorted(self._program(function).op_types)

    def make_state(self) -> dict[str, Tensor]:
        """Zeroed state tensors for every state any function declares."""
        return {s.name: torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in self._states.values()}

    # running -------------------------------------------------------------
    def predict(self, inputs: Mapping[str, np.ndarray | Tensor], state: Mapping[str, Tensor] | None = None,
                function: str | None = None) -> dict[str, np.ndarray]:
        """Run ``function`` (default: the package's default) on ``inputs``;
        ``state`` tensors are updated in place."""
        prog = self._program(function)
        env = self._execute(prog, inputs, state)
        return {name: env[slot].to("cpu", copy=True).numpy() for name, slot in prog.outputs}

    def predict_tensors(self, inputs: Mapping[str, np.ndarray | Tensor],
                        state: Mapping[str, Tensor] | None = None,
                        function: str | None = None) -> dict[str, Tensor]:
        """Like :meth:`predict`, returning torch tensors on the model's device
        (no trip through host memory: for chaining parts on a GPU). They are
        inference tensors: ``clone()`` one before modifying it in place."""
        prog = self._program(function)
        env = self._execute(prog, inputs, state)
        return {name: env[slot].clone() if slot in prog.shared_outputs else env[slot]
                for name, slot in prog.outputs}

    def _execute(self, prog: Program, inputs: Mapping[str, Any], state: Mapping[str, Tensor] | None
                 ) -> list[Any]:
        feeds = self._feeds(prog, inputs)
        env = list(prog.template)
        env[STATE_SLOT] = self._check_state(prog, state)
        for spec, tensor in zip(prog.inputs, feeds):
            env[spec.slot] = tensor
        with torch.inference_mode():
            for run, out, frees in prog.steps:
                if out.__class__ is int:
                    env[out] = run(env)
                else:
                    for slot, value in zip(out, run(env)):
                        env[slot] = value
                for slot in frees:
                    env[slot] = None
        return env

    # helpers ---------------------------------------------------------------
    def _program(self, function: str | None) -> Program:
        name = function or self._default
        prog = self._programs.get(name)
        if prog is None:
            raise AnemllError(f"{self.path.name} has no function {name!r} (it has {', '.join(self._programs)})",
                              "call predict with one of those function names", stage="predict", code="bad_input")
        return prog

    def _feeds(self, prog: Program, inputs: Mapping[str, Any]) -> list[Tensor]:
        expected = [i.name for i in prog.inputs]
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unexpected {', '.join(extra)}"] if extra else [])
            raise AnemllError(f"inputs for {self.path.name}:{prog.name} do not match: {'; '.join(parts)}",
                              f"pass exactly: {', '.join(expected)}", stage="predict", code="bad_input")
        feeds = []
        for spec in prog.inputs:
            value = inputs[spec.name]
            t = value if isinstance(value, Tensor) else tensor_of(value, None, None)
            shape = tuple(t.shape)
            if not spec.accepts(shape):
                raise AnemllError(f"input {spec.name!r} of {self.path.name}:{prog.name} has shape {shape}",
                                  f"this model accepts {spec.allowed()}", stage="predict", code="bad_input")
            feeds.append(t.to(device=self.device, dtype=spec.dtype))
        return feeds

    def _check_state(self, prog: Program, state: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
        if not prog.states:
            return state or {}
        if state is None:
            raise AnemllError(f"{self.path.name}:{prog.name} is stateful and no state was given",
                              "pass state=model.make_state() (and keep passing the same dict)",
                              stage="predict", code="bad_input")
        for spec in prog.states:
            t = state.get(spec.name)
            if not isinstance(t, Tensor):
                raise AnemllError(f"state {spec.name!r} is missing or not a torch tensor",
                                  "create states with make_state()", stage="predict", code="bad_input")
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype or t.device != self.device:
                raise AnemllError(
                    f"state {spec.name!r} is {tuple(t.shape)} {t.dtype} on {t.device}; "
                    f"{self.path.name} needs {spec.shape} {spec.dtype} on {self.device}",
                    "models sharing a state must declare the same state shape and run on one device",
                    stage="predict", code="bad_input")
        return state

    def _collect_states(self) -> dict[str, StateSpec]:
        states: dict[str, StateSpec] = {}
        for prog in self._programs.values():
            for s in prog.states:
                seen = states.setdefault(s.name, s)
                if seen != s:
                    raise AnemllError(f"state {s.name!r} is declared as {seen.shape} and {s.shape}",
                                      "the package is inconsistent; re-convert it", stage="runtime",
                                      code="bad_input")
        return states
