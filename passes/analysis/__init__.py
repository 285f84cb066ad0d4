"""Graph analysis shared by every pass: ``capture`` (torch.export capture, weight layers and their
uses), ``graph_utils`` (joint-graph node helpers), ``weight_ops`` (a TorchFunctionMode that hands a
pass the eager ops using a weight inside a module call), ``side_effects`` and ``state_children``."""

from .capture import CaptureError, GraphCapture, capture

__all__ = ["CaptureError", "GraphCapture", "capture"]
