"""The ``eager`` backend: the step graph runs as the GraphModule it is (the reference)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import graph_output_nodes


class EagerBackend:
    """Returns ``gm`` itself; has no artifact format."""

    name = "eager"

    def compile(self, gm: GraphModule, example_inputs: Sequence[Tensor], **options: Any) -> GraphModule:
        if options:
            raise TypeError(f"backend 'eager' takes no options, got {sorted(options)}")
        graph_output_nodes(gm)  # fail early on a graph that does not return a tuple
        return gm

    def export(
        self, gm: GraphModule, example_inputs: Sequence[Tensor], directory: Path, stem: str, **options: Any
    ) -> dict[str, Any]:
        raise NotImplementedError(
            "backend 'eager' has no artifact format: export with format='aoti' (AOTInductor "
            "packages) or format='onnx' / 'tensorrt'"
        )

    def load(self, directory: Path, entry: dict[str, Any], **options: Any) -> GraphModule:
        raise NotImplementedError(
            "backend 'eager' has no artifact format; load the entry with the backend named in "
            f"it ({entry.get('backend')!r})"
        )
