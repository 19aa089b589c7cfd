"""Reading and updating states."""
from __future__ import annotations

from typing import Mapping

from anemlld.runtime.portable.registry import Kernel, Tensor, OpView, builds


@builds("read_state")
def _read_state(b: OpView) -> Kernel:
    name = b.var("input").name
    if b.mode == "alias":
        return (lambda states: states[name]), ("input",)
    return (lambda states: states[name].clone()), ("input",)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@builds("coreml_update_state")
def _update_state(b: OpView) -> Kernel:
    name = b.var("state").name
    alias = b.mode == "alias"

    def run(states: Mapping[str, Tensor], value: Tensor) -> Tensor:
        st = states[name]
        if value is not st:  # an in-place slice_update already wrote it
            st.copy_(value.clone() if _shares_memory(value, st) else value)
        return st if alias else st.clone()
    return run, ("state", "value")
