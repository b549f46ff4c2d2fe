"""Benchmarks: side-by-side measurements that write JSON and a markdown table."""

import os
import platform

import torch


def machine() -> str:
    """One line naming the machine the figures come from."""
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
