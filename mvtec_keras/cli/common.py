"""What every script shares: error handling, run folders, info.json, rebuilding the data of a run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Optional

from ..errors import EXIT_BAD_INPUT, InputError

INFO_FILE = "info.json"

#: Smoke-test knob (for tests that run documented commands, e.g. tests/test_readme.py): when this
#: environment variable is set, train.py and extract.py cap training at SMOKE_EPOCHS epochs and images
#: at SMOKE_SIZE pixels, and say so. The results are then meaningless; never set it for real work.
SMOKE_ENV = "MVTEC_KERAS_SMOKE_TEST"
SMOKE_EPOCHS = 1
SMOKE_SIZE = 64


def check_range(value, flag: str, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """Refuse a numeric flag outside ``[low, high]`` (``(`` / ``)`` with ``low_open`` / ``high_open``)
    with one line naming the flag; None (flag not given) passes. Returns the value."""
    if value is None:
        return value
    bad = value != value  # NaN
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise InputError(f"{flag} must be in {interval}, got {value}")
    return value


def option_value(text: str):
    """A KEY=VALUE option's value: JSON where it parses (numbers, true/false, null, lists), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items, flag: str) -> dict:
    """``["k=50", "mode=fast"]`` -> ``{"k": 50, "mode": "fast"}``; a malformed item is one line naming ``flag``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} expects KEY=VALUE, got '{item}'")
        out[key.strip()] = option_value(value)
    return out


def parse_scoped_options(items, scopes, flag: str = "--set") -> dict:
    """``["ganomaly.filters=64"]`` -> ``{"ganomaly": {"filters": 64}}`` for SCOPE.OPTION=VALUE items whose
    SCOPE is one of ``scopes`` (the benches' per-method settings)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        scope, _, option = key.partition(".")
        if scope not in scopes or not option or not value:
            raise InputError(f"{flag} {item!r}: expected NAME.OPTION=VALUE with NAME in {', '.join(scopes)}")
        out.setdefault(scope, {})[option] = option_value(value)
    return out


def apply_smoke_caps(args, native_size=None) -> bool:
    """Honour :data:`SMOKE_ENV`: cap ``args.epochs`` and ``args.size`` (``args.crop`` scaled with it).

    ``native_size`` is the size used when ``--size`` is not given. Returns whether the caps apply.
    """
    if not os.environ.get(SMOKE_ENV):
        return False
    if getattr(args, "epochs", None) is not None:
        args.epochs = min(args.epochs, SMOKE_EPOCHS)
    if hasattr(args, "size"):
        old = args.size or native_size
        args.size = SMOKE_SIZE if old is None else min(old, SMOKE_SIZE)
        if getattr(args, "crop", None) and old:
            args.crop = min(args.size, max(8, round(args.crop * args.size / old)))
    print(f"{SMOKE_ENV} is set (smoke test): epochs <= {SMOKE_EPOCHS}, image size <= {SMOKE_SIZE}; "
          "results are not meaningful")
    return True


VERBOSE_FLAG = "--verbose"


def add_verbose(p):
    """The flag that lets TensorFlow's own log lines through (read by :func:`run_main` before TF loads)."""
    p.add_argument(VERBOSE_FLAG, action="store_true",
                   help="show TensorFlow's own log lines (hidden by default; TF_CPP_MIN_LOG_LEVEL, when set, decides)")
    return p


def quiet_tensorflow(verbose: bool = False) -> None:
    """Keep TensorFlow's C++ log lines (oneDNN notices, ``E0000 ... remapper failed``: harmless, but an
    ``E`` reads like a failure) out of a command's output, unless asked for or set by the user."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def run_main(fn, argv=None) -> int:
    """Call ``fn(argv)``; bad input becomes one line on stderr and exit code 2."""
    quiet_tensorflow(VERBOSE_FLAG in (sys.argv[1:] if argv is None else argv))
    try:
        fn(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a decoding failure deep inside tf.data still names what it can
        if type(e).__name__ in ("InvalidArgumentError", "DataLossError", "NotFoundError"):
            msg = " ".join(str(getattr(e, "message", e)).split())[:300]
            print(f"error: could not read an input image: {msg}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    return 0


@contextlib.contextmanager
def output_dir(path: str, keep_existing: bool = False):
    """Create ``path`` for a run; if the run fails, remove what this run created.

    With ``keep_existing`` (``--resume``, or a later script adding files to a
    model folder) an existing folder is never removed.
    """
    existed = os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except KeyboardInterrupt:
        # Keep the backup so that --resume can continue; without info.json the
        # folder is not mistaken for a finished model.
        print(f"interrupted: resume with --resume --out {path}", file=sys.stderr)
        raise
    except BaseException:
        if not existed and not keep_existing:
            shutil.rmtree(path, ignore_errors=True)
        raise


def model_dir_from_arg(path: str, flag: str = "-p/--path") -> str:
    """``-p`` accepts the model file (``DIR/model.keras``) or the run folder itself."""
    if not path:
        raise InputError(f"{flag} is required")
    if os.path.isdir(path):
        d = path
    elif os.path.isfile(path):
        d = os.path.dirname(os.path.abspath(path))
    else:
        raise InputError(f"{flag}: model not found: {path}")
    if not os.path.isfile(os.path.join(d, INFO_FILE)):
        raise InputError(f"{flag}: {os.path.join(d, INFO_FILE)} is missing; was this folder written by train.py or extract.py?")
    return os.path.abspath(d)


def read_info(model_dir: str) -> dict:
    p = os.path.join(model_dir, INFO_FILE)
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {p}: {e}") from None


def add_data_args(parser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("-d", "--data", help="MVTec-layout category folder, or a folder of normal images "
                   "(folder mode). Default: the embedded demo category")
    g.add_argument("--abnormal", help="folder mode: folder of abnormal images")
    g.add_argument("--masks", help="folder mode: folder of masks (<stem>_mask.png or <stem>.png)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train/good (default 0.1)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, shuffling and initialisation")


def check_data_args(args) -> None:
    """Range checks of the flags :func:`add_data_args` adds."""
    check_range(args.val_fraction, "--val-fraction", 0, 1, high_open=True)
    check_range(args.seed, "--seed", 0, 2**32 - 1)


def resolve_category(data: Optional[str], abnormal=None, masks=None, seed: int = 0):
    """The category of a run: a folder given by the user, or the demo (built on first use)."""
    from ..data import discover

    if data is None:
        from ..data.demo import build_demo

        root = build_demo()
        cat = discover(str(root))
        cat.mode = "demo"
        return cat
    if not os.path.isdir(data):
        raise InputError(f"-d/--data: folder not found: {data}")
    for flag, p in (("--abnormal", abnormal), ("--masks", masks)):
        if p and not os.path.isdir(p):
            raise InputError(f"{flag}: folder not found: {p}")
    return discover(data, abnormal_dir=abnormal, mask_dir=masks, seed=seed)


def print_run_header(cat, job: str, strategy, strategy_name: str) -> None:
    """What a fitting run is about to do: its data, the job, the devices and the distribution strategy."""
    from .. import distribute
    from ..devices import describe

    print(cat.summary())
    print(job)
    print(describe())
    print(distribute.describe(strategy, strategy_name))


def data_info(cat, args, validation) -> dict:
    return {
        "root": cat.root,
        "name": cat.name,
        "mode": cat.mode,
        "abnormal_dir": getattr(args, "abnormal", None),
        "mask_dir": getattr(args, "masks", None),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "n_train": len(cat.train) - len(validation),
        "validation_files": [s.path for s in validation],
    }


def category_from_info(info: dict):
    """Rediscover the category a model was trained on, from its info.json."""
    d = info.get("data") or {}
    root = d.get("root")
    if d.get("mode") == "demo" and (not root or not os.path.isdir(root)):
        return resolve_category(None)
    if not root or not os.path.isdir(root):
        raise InputError(f"the training data folder recorded in info.json is gone: {root}")
    cat = resolve_category(root, d.get("abnormal_dir"), d.get("mask_dir"), d.get("seed", 0))
    if d.get("mode") == "demo":
        cat.mode = "demo"
    return cat


def validation_samples(cat, info: dict) -> list:
    wanted = set((info.get("data") or {}).get("validation_files") or [])
    return [s for s in cat.train if s.path in wanted]
