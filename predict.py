#!/usr/bin/env python3
"""Thin wrapper: see `python predict.py -h` and mvtec_keras/cli/predict.py."""
import sys

from mvtec_keras.cli.predict import cli

if __name__ == "__main__":
    sys.exit(cli())
