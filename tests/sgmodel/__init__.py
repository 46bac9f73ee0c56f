"""Tests of the sgmodel package: model parts, data streams, training, evaluation, the command and the page."""
