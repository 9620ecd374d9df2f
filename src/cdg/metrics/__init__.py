"""Metrics: MAC counting and FLOPs reduction (Eq. 13 and exact)."""

from cdg.metrics.flops import GATE_OPS_PER_ELEMENT, LayerMACs, MACReport, count_macs, flops_reduction_eq13, mac_report

__all__ = ["GATE_OPS_PER_ELEMENT", "LayerMACs", "MACReport", "count_macs", "flops_reduction_eq13", "mac_report"]
