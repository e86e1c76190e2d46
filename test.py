#!/usr/bin/env python3
"""Thin wrapper: see `python test.py -h` and mvtec_keras/cli/test.py."""
import sys

from mvtec_keras.cli.test import cli

if __name__ == "__main__":
    sys.exit(cli())
