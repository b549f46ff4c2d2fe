"""Benchmarks: side-by-side measurements that write JSON and a markdown table."""
