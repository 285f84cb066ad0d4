"""Graph analysis shared by every pass: ``capture`` (torch.export capture, weight layers and their
uses), ``graph_utils`` (joint-graph node helpers) and ``flops`` (measured FLOP counts)."""

from .capture import CaptureError, GraphCapture, capture

__all__ = ["CaptureError", "GraphCapture", "capture"]
