"""Figures and reports: montages of slices with label overlays, the HTML report."""
