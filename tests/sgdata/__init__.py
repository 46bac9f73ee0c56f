"""Tests of the sgdata package: sources, builds, the command line, bad input."""
