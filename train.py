#!/usr/bin/env python3
"""Thin wrapper: see `python train.py -h` and mvtec_keras/cli/train.py."""
import sys

from mvtec_keras.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())
