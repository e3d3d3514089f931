"""Example copra-fl plug-in: one aggregation rule, registered by entry point."""

from copra_example_strategy.rules import GeometricMedian

__all__ = ["GeometricMedian"]
