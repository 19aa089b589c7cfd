"""The alias plan: which state updates and views can share memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


STATE_OPS = frozenset({"read_state", "coreml_update_state"})
# Ops whose torch implementation may return a view of (or the very object of)
# an input. The alias plan follows them; every other op must return new memory.
VIEW_OPS = frozenset({
    "identity", "reshape", "squeeze", "expand_dims", "transpose", "slice_by_index",
    "slice_by_size", "split", "cast", "flatten2d",
})


@dataclass
class Node:
    """A runtime op after folding: its slots and, for state ops, the state."""

    op: Any
    ins: dict[str, Any]      # input name -> slot or tuple of slots
    outs: tuple[int, ...]
    state: str | None = None

    def in_slots(self) -> Iterable[int]:
        for s in self.ins.values():
            yield from (s if isinstance(s, tuple) else (s,))


def plan_aliases(nodes: list[Node], out_slots: set[int], fixed: dict[int, str]
                  ) -> tuple[dict[int, str], set[int], dict[int, frozenset]]:
    """Decide which state reads hand out the state tensor itself ("alias") and
    which slice_updates write into their input ("inplace").

    Start optimistic, then demote any choice under which some value would be
    read after memory it lives in was overwritten, until no conflict is left.
    A typical KV-cache write (read_state -> slice_update -> coreml_update_state
    -> slice_by_index for attention) ends up copying nothing.
    """
    n = len(nodes)
    defined: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for s in node.outs:
            defined[s] = i
            last.setdefault(s, i)
        for s in node.in_slots():
            last[s] = i
    for s in out_slots:
        last[s] = n
    touches: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.state is not None:
            touches.setdefault(node.state, []).append(i)

    modes: dict[int, str] = {}
    for i, node in enumerate(nodes):
        t = node.op.op_type
        if t in STATE_OPS:
            modes[i] = "alias"
        elif t == "slice_update":
            x = node.ins["x"]
            ok = x not in fixed and last.get(x) == i
            modes[i] = "inplace" if ok else "copy"

    while True:
        buffers, tied = _buffers(nodes, modes, fixed)
        by_buffer: dict[Any, list[int]] = {}
        for s, bs in buffers.items():
            for buf in bs:
                by_buffer.setdefault(buf, []).append(s)

        def stale(write_at: int, bufs: Iterable[Any], skip: int | None = None) -> list[int]:
            hits = []
            for buf in bufs:
                for v in by_buffer.get(buf, ()):
                    if v != skip and defined.get(v, -1) < write_at < last.get(v, -1):
                        hits.append(v)
            return hits

        demote: set[int] = set()
        clone_updates: set[int] = set()
        for i, node in enumerate(nodes):
            t = node.op.op_type
            if t == "coreml_update_state":
                value = node.ins["value"]
                if tied.get(value) == node.state:
                    continue  # already written in place; nothing is copied here
                for v in stale(i, [("state", node.state)]):
                    roots = _roots(v, node.state, nodes, modes, defined)
                    # Every state alias comes from a root; copying everywhere is the safe fallback.
                    demote.update(roots or {j for j, m in modes.items() if m != "copy"})
            elif t == "slice_update" and modes[i] == "inplace":
                x, y = node.ins["x"], node.outs[0]
                bufs = buffers[x]
                if any(b[0] in ("in", "const") for b in bufs) or last.get(x) != i or stale(i, bufs, skip=x):
                    demote.add(i)
                    continue
                states = {b[1] for b in bufs if b[0] == "state"}
                if states:
                    s = tied.get(x)
                    if len(states) > 1 or s is None or s not in states or not _stored_next(
                            i, s, y, nodes, touches[s], tied):
                        demote.add(i)
                        continue
                if buffers.get(node.ins["update"], frozenset()) & bufs:
                    clone_updates.add(i)
        if not demote:
            return modes, clone_updates, buffers
        for i in demote:
            modes[i] = "copy"


def _buffers(nodes: list[Node], modes: dict[int, str], fixed: dict[int, str]
             ) -> tuple[dict[int, frozenset], dict[int, str]]:
    """Which memory each slot may live in, and which slots are the state tensor itself."""
    buffers: dict[int, frozenset] = {s: frozenset({(kind, s)}) for s, kind in fixed.items()}
    tied: dict[int, str] = {}
    for i, node in enumerate(nodes):
        t = node.op.op_type
        if t in STATE_OPS:
            if modes[i] == "alias":
                for s in node.outs:
                    buffers[s] = frozenset({("state", node.state)})
                    tied[s] = node.state
                continue
        elif t == "slice_update" and modes[i] == "inplace":
            x = node.ins["x"]
            buffers[node.outs[0]] = buffers.get(x, frozenset())
            if x in tied:
                tied[node.outs[0]] = tied[x]
            continue
        elif t in VIEW_OPS:
            src = buffers.get(node.ins["x"], frozenset())
            for s in node.outs:
                buffers[s] = src | {("fresh", s)}
            continue
        for s in node.outs:
            buffers[s] = frozenset({("fresh", s)})
    return buffers, tied


def _roots(v: int, state: str, nodes: list[Node], modes: dict[int, str], defined: dict[int, int]
           ) -> set[int]:
    """The aliasing choices that make slot ``v`` share the state's memory."""
    found: set[int] = set()
    todo = [v]
    seen = set()
    while todo:
        s = todo.pop()
        if s in seen or s not in defined:
            continue
        seen.add(s)
        i = defined[s]
        node = nodes[i]
        t = node.op.op_type
        if t in STATE_OPS and modes.get(i) == "alias":
            found.add(i)
        elif t == "slice_update" and modes.get(i) == "inplace":
            found.add(i)
            todo.append(node.ins["x"])
        elif t in VIEW_OPS:
            todo.append(node.ins["x"])
    return found


def _stored_next(i: int, state: str, value_slot: int, nodes: list[Node], touches: list[int],
                 tied: dict[int, str]) -> bool:
    """Whether the next op touching ``state`` after ``i`` stores ``value_slot``
    (or a later in-place write of it: a value still tied to the state)."""
    for j in touches:
        if j > i:
            node = nodes[j]
            stored = node.ins.get("value")
            return node.op.op_type == "coreml_update_state" and (stored == value_slot or tied.get(stored) == state)
    return False
