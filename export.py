#!/usr/bin/env python3
"""Thin wrapper: see `python export.py -h` and mvtec_keras/cli/export.py."""
import sys

from mvtec_keras.cli.export import cli

if __name__ == "__main__":
    sys.exit(cli())
