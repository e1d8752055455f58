"""engine.graphs: which graphs a device gets, and the static graph's replay semantics (the
captured path itself is exact against generate: tests/integration/test_engine_exactness.py)."""

from __future__ import annotations

import pytest
import torch

from vlserve.engine.graphs import StaticGraph, graph_factory


def test_graph_factory_by_device_and_mode() -> None:
    assert graph_factory("cpu", "auto") is None  # a launch costs nothing on the CPU
    assert graph_factory("npu", "auto") is None  # no NPU graph backend yet
    assert graph_factory("cuda", "none") is None  # --enforce-eager
    assert graph_factory("cpu", "static") is StaticGraph
    with pytest.raises(ValueError, match="auto, none or static"):
        graph_factory("cpu", "cuda")


def test_a_static_graph_replays_into_the_captured_output() -> None:
    """Replays refill the tensor capture returned, from the buffers' current contents: the
    contract callers of CUDA graphs rely on."""
    buffer = torch.tensor([1.0, 2.0])
    graph = StaticGraph()
    out = graph.capture(lambda: buffer * 2)
    assert out.tolist() == [2.0, 4.0]
    buffer.copy_(torch.tensor([5.0, 7.0]))
    graph.replay()
    assert out.tolist() == [10.0, 14.0]
