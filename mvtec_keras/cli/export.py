"""export.py: export a trained or fitted run to LiteRT (.tflite), SavedModel or ONNX, with a side .json."""

from __future__ import annotations

import argparse
import sys

from .common import add_verbose, model_dir_from_arg, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--path", required=True, help="DIR/model.keras or the run folder")
    p.add_argument("--format", default="litert", help="litert | saved_model | onnx (default litert)")
    p.add_argument("--precision", default="float32",
                   help="LiteRT: float32 | float16 | dynamic | int8 (default float32); others are float32")
    p.add_argument("--calibration", type=int, default=100,
                   help="int8: training images used to calibrate the quantisation (default 100)")
    p.add_argument("--out", help="output file (folder for saved_model); default RUN/export/<detector>_<precision>.tflite")
    p.add_argument("-q", "--quiet", action="store_true")
    return add_verbose(p)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from ..export.exporter import check_request, export_run

    check_request(args.format, args.precision, args.calibration)
    model_dir = model_dir_from_arg(args.path)
    export_run(model_dir, args.format, args.precision, args.calibration, args.out, verbose=not args.quiet)


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
