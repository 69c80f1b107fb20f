"""Scaling studies: a ladder of sizes per architecture, power-law fits, plots."""
