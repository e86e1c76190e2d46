#!/usr/bin/env python3
"""Thin wrapper: see `python finetune.py -h` and mvtec_keras/cli/finetune.py."""
import sys

from mvtec_keras.cli.finetune import cli

if __name__ == "__main__":
    sys.exit(cli())
