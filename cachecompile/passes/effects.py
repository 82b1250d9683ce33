"""Which nodes a pass may merge, move or drop: side effects and mutation, found from op schemas.

Export keeps in-place ops on intermediates: diffusers' sin-cos position embedding, computed at
run time when the input size differs from the native one, builds two ``arange`` tensors and
divides each in place (``aten.div_``). Two such ``arange`` nodes look identical, but merging them
applies one division twice. So a node is *frozen* (never merged or moved) when

- it has a side effect: it mutates an input, is random (except dropout that draws nothing:
  attention with ``dropout_p=0``, ``dropout`` in eval mode), or is marked effectful;
- its value is mutated by some op (directly, or through a view that shares its storage);
- it reads a value that some op mutates (the value it reads depends on where it runs).

Aliasing follows the op schemas (``Tensor(a)`` views, ``Tensor(a!)`` writes); a call whose
aliasing is unknown (a Python function other than ``getitem``) is taken to alias its inputs.

Collectives (a model run with context parallelism: ``_c10d_functional.all_to_all_single``,
``all_gather_into_tensor`` ..., each followed by ``wait_tensor``) are frozen too: every rank must
issue the same collectives in the same order, so none is merged or moved. They are dropped only
as a whole, when nothing reads the value they deliver: the collective and its waits go together
(a reused region's attention takes its all-to-alls with it). Every rank captures the same graph
(its chunk index and process group are constants in it) and runs the same passes on the same
plan, so every rank drops the same collectives.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

__all__ = ["has_side_effects", "mutated_nodes", "frozen_nodes", "is_collective", "is_wait", "collective_groups"]

# Namespaces of the ops that talk to other ranks (functional collectives as export records them,
# and the in-place c10d ops).
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d", "_dtensor")


def is_collective(node: torch.fx.Node) -> bool:
    """A call that communicates with other ranks (a wait on one included)."""
    return node.op == "call_function" and getattr(node.target, "namespace", None) in _COLLECTIVE_NAMESPACES


def is_wait(node: torch.fx.Node) -> bool:
    """A ``wait_tensor``: the point where a functional collective's result is ready."""
    return is_collective(node) and node.target._schema.name.endswith("wait_tensor")


def collective_groups(graph: torch.fx.Graph) -> list[str]:
    """The process groups that the graph's collectives talk over, each once, in graph order."""
    groups: list[str] = []
    for node in graph.nodes:
        if is_collective(node) and not is_wait(node):
            group = _arg(node, "group_name")
            if isinstance(group, str) and group not in groups:
                groups.append(group)
    return groups


def _dead_collective_wait(node: torch.fx.Node) -> bool:
    """A wait whose collective delivers to no one: the wait and all other users of the collective
    are waits that nothing reads (a functional collective is pure, only its wait is marked)."""
    if not is_wait(node) or node.users:
        return False
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or not is_collective(source) or is_wait(source):
        return False
    if source.target._schema.is_mutable:
        return False
    return all(is_wait(u) and not u.users for u in source.users)

def _arg(node: torch.fx.Node, name: str, missing: object = None) -> object:
    """The value of the schema argument ``name`` of a call (positional, keyword or the schema's
    default); ``missing`` when the op has no such argument."""
    args = node.target._schema.arguments
    for pos, a in enumerate(args):
        if a.name == name:
            if len(node.args) > pos:
                return node.args[pos]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else missing)
    return missing


def _unused_randomness(node: torch.fx.Node) -> bool:
    """A dropout-like op that draws nothing: ``train=False`` or a probability of 0 (attention is
    marked random for its ``dropout_p``; ``aten.dropout`` in eval mode is the identity)."""
    if node.op != "call_function" or not hasattr(node.target, "_schema"):
        return False
    if not getattr(node.target, "_nondeterministic_seeded", False) or node.target._schema.is_mutable:
        return False
    if _arg(node, "train", True) is False:
        return True
    p = _arg(node, "dropout_p", _arg(node, "p"))  # attention's and dropout's names
    return isinstance(p, (int, float)) and p == 0


def has_side_effects(node: torch.fx.Node) -> bool:
    """True for a node that must run even when nothing reads it: placeholders and outputs,
    mutating and effectful ops, and random ops (dropout that draws nothing excepted). A wait on a
    functional collective whose result nothing reads is not: the collective goes with it."""
    if _unused_randomness(node) or _dead_collective_wait(node):
        return False
    return node.is_impure(impure_random=True)


class _Aliases:
    """Union-find over nodes that may share storage."""

    def __init__(self) -> None:
        self.parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(self, n: torch.fx.Node) -> torch.fx.Node:
        root = n
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while n is not root:
            self.parent[n], n = root, self.parent.get(n, n)
        return root

    def union(self, a: torch.fx.Node, b: torch.fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb


def _tensor_args(node: torch.fx.Node) -> list[tuple[torch.fx.Node, object]]:
    """(argument node, schema argument or None) for every node among the call's arguments."""
    schema = getattr(node.target, "_schema", None)
    out: list[tuple[torch.fx.Node, object]] = []
    if schema is not None:
        by_name = {a.name: a for a in schema.arguments}
        for i, a in enumerate(node.args):
            arg = schema.arguments[i] if i < len(schema.arguments) else None
            out += [(n, arg) for n in _nodes_in(a)]
        for k, a in node.kwargs.items():
            out += [(n, by_name.get(k)) for n in _nodes_in(a)]
        return out
    for a in (*node.args, *node.kwargs.values()):
        out += [(n, None) for n in _nodes_in(a)]
    return out


def _nodes_in(value: object) -> list[torch.fx.Node]:
    if isinstance(value, torch.fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _nodes_in(v)]
    return []


def mutated_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node whose storage some op of the graph writes (through any alias)."""
    aliases = _Aliases()
    written: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            aliases.union(node, node.args[0])  # an element of a tuple of views
            continue
        has_schema = hasattr(node.target, "_schema")
        for arg_node, arg in _tensor_args(node):
            info = getattr(arg, "alias_info", None)
            if not has_schema or info is not None:
                aliases.union(node, arg_node)  # a view, an in-place op, or unknown aliasing
            if info is not None and info.is_write:
                written.append(arg_node)
    roots = {aliases.find(n) for n in written}
    return {n for n in graph.nodes if aliases.find(n) in roots}


def frozen_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that a pass must not merge or move (see the module docstring)."""
    mutated = mutated_nodes(graph)
    frozen = set(mutated)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if has_side_effects(node) or is_collective(node) or any(n in mutated for n, _ in _tensor_args(node)):
            frozen.add(node)
    return frozen
