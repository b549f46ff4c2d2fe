"""Rendering: plots and (later) the HTML report. Renders what analysis returns; computes nothing."""
