"""Merge methods: one explicit registry (`METHODS`) and the module-by-module driver (`merge`)."""

from adapter_fusion.merge.driver import MergeResult, ModuleReport, merge
from adapter_fusion.merge.methods import METHODS, get_method, parse_parameters

__all__ = ["METHODS", "MergeResult", "ModuleReport", "get_method", "merge", "parse_parameters"]
