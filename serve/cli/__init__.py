"""The serving stage's `torchship` subcommands, one module each: thin click layers over plain functions."""
