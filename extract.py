#!/usr/bin/env python3
"""Thin wrapper: see `python extract.py -h` and mvtec_keras/cli/extract.py."""
import sys

from mvtec_keras.cli.extract import cli

if __name__ == "__main__":
    sys.exit(cli())
