"""Benchmark data: OBQA, ARC-Easy/Challenge, BoolQ, WinoGrande, MMLU as validated ``MCExample``s, from a
local directory (the layout of ``../shared/data``) or the hub (``datasets``)."""

from bmoe_jax.data.records import LETTERS, DataError, LoadReport, MCExample
from bmoe_jax.data.registry import BENCHMARKS, DATA_DIR_ENV, MCDataset, carve, load

__all__ = ["LETTERS", "DataError", "LoadReport", "MCExample", "BENCHMARKS", "DATA_DIR_ENV", "MCDataset",
           "carve", "load"]
