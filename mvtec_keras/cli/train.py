"""train.py: train a reconstruction or GAN detector on the defect-free images of one category."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import InputError
from ..fileio import write_json
from .common import (add_data_args, add_verbose, apply_smoke_caps, check_data_args, check_range, data_info, output_dir,
                     parse_key_values, print_run_header, resolve_category, run_main)

AE_ARCHITECTURES = ("mvtecCAE", "baselineCAE", "inceptionCAE", "resnetCAE", "skipCAE")
GAN_ARCHITECTURES = ("ganomaly", "efficientgan", "anogan", "dense_ae")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train an autoencoder (or GAN) on defect-free images; writes model.keras and info.json.",
    )
    add_data_args(p)
    p.add_argument("-a", "--architecture", default="mvtecCAE",
                   help=f"one of {', '.join(AE_ARCHITECTURES + GAN_ARCHITECTURES)} (default mvtecCAE)")
    p.add_argument("-c", "--color", default="grayscale", help="grayscale | rgb (default grayscale)")
    p.add_argument("-l", "--loss", default="ssim", help="autoencoders: ssim | mssim | l2 (default ssim)")
    p.add_argument("-b", "--batch-size", type=int, default=8,
                   help="global batch: under --strategy it is split over the replicas (a multiple of them)")
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs (early stopping decides)")
    p.add_argument("--lr", default="2e-4", help="learning rate, or 'auto' for a range test first")
    p.add_argument("--size", type=int, default=None, help="image size (default 256; GANs: their default)")
    p.add_argument("--patience", type=int, default=12, help="early-stopping patience in epochs")
    p.add_argument("--no-augment", action="store_true", help="no rotation / shift / brightness augmentation")
    p.add_argument("--flip", action="store_true", help="also flip training images (only for symmetric products)")
    p.add_argument("--rotation", type=float, default=5.0,
                   help="random rotation range in degrees, +-DEG (default 5; 180 for rotation-symmetric products "
                        "seen from above, e.g. bottle)")
    p.add_argument("-i", "--inspect", action="store_true", help="write inspection images")
    p.add_argument("--out", help="output folder (default runs/<category>/<arch>-<loss>-<color>-<time>)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run in --out")
    p.add_argument("--members", type=int, default=1,
                   help="GANs: train a seed ensemble of K models (seeds SEED ... SEED+K-1) and average their "
                        "standardised scores; steadier than one GAN, K times the training (default 1)")
    p.add_argument("--jit", action="store_true", help="XLA jit_compile (slower on CPU; measure first)")
    p.add_argument("--precision", default="float32",
                   help="float32 | mixed_bfloat16 | mixed_float16 | auto (auto: mixed_float16 on GPUs of compute "
                        "capability >= 7.0, mixed_bfloat16 on CPUs with AVX512-BF16/AMX, float32 otherwise; "
                        "see docs/bench_ae_throughput.md)")
    p.add_argument("--strategy", default="none",
                   help="none | mirrored | multiworker | auto (default none): mirrored = tf.distribute over the "
                        "local GPUs; multiworker = over the cluster in TF_CONFIG (start train.py on every worker; "
                        "the chief writes --out); auto = multiworker when TF_CONFIG names more than one worker, "
                        "else mirrored when more than one GPU is visible, else none. -b is the global batch "
                        "and --lr is not rescaled; see docs/distributed.md")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="GAN option (JSON values; repeatable), e.g. --param selection=best_val "
                        "--param filters=64 --param adversarial=bce --param tanh_output=true")
    p.add_argument("-q", "--quiet", action="store_true")
    return add_verbose(p)


#: detector parameters that train.py's own flags set (so --param may not)
FLAG_OF = {"image_size": "--size", "channels": "-c/--color", "epochs": "--epochs", "batch_size": "-b/--batch-size",
           "learning_rate": "--lr", "seed": "--seed"}


def _canonical_arch(name: str) -> str:
    for a in AE_ARCHITECTURES + GAN_ARCHITECTURES:
        if a.lower() == name.lower():
            return a
    raise InputError(f"-a/--architecture: unknown '{name}'; choose from {', '.join(AE_ARCHITECTURES + GAN_ARCHITECTURES)}")


def make_detector(args, prep):
    """Build the detector the arguments describe (constructor only; nothing trained yet)."""
    arch = _canonical_arch(args.architecture)
    if arch in AE_ARCHITECTURES:
        if args.param:
            raise InputError(f"--param is for GANs; {arch}'s options are flags (-l, --lr, --patience, ...)")
        from ..detectors.autoencoder import AutoencoderDetector

        from ..detectors.autoencoder import PRECISIONS, fast_precision

        if args.precision == "auto":
            args.precision = fast_precision()
        if args.precision not in PRECISIONS:
            raise InputError(f"--precision: unknown '{args.precision}'; choose {' or '.join(PRECISIONS)}")
        if args.loss not in ("ssim", "mssim", "l2"):
            raise InputError(f"-l/--loss: unknown loss '{args.loss}'; choose ssim, mssim or l2")
        return AutoencoderDetector(
            architecture=arch,
            input_shape=prep.input_shape,
            loss=args.loss,
            residual="l2" if args.loss == "l2" else "ssim",
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr if args.lr == "auto" else _float(args.lr, "--lr"),
            patience=args.patience,
            seed=args.seed,
            jit_compile=args.jit,
            precision=args.precision,
        )
    from ..detectors import detector_class
    from ..models.gans import SUPPORTED_SIZES

    if prep.size not in SUPPORTED_SIZES:
        raise InputError(f"--size: {arch} supports {', '.join(map(str, SUPPORTED_SIZES))}, got {prep.size}")
    if args.lr == "auto":
        raise InputError(f"--lr auto is for autoencoders; give {arch} a number")
    config = dict(image_size=prep.size, channels=prep.channels, epochs=args.epochs, batch_size=args.batch_size,
                  learning_rate=_float(args.lr, "--lr"), seed=args.seed)
    options = parse_key_values(args.param, "--param")
    clash = sorted(options.keys() & config.keys())
    if clash:
        raise InputError(f"--param {clash[0]}: set by its own flag ({FLAG_OF[clash[0]]})")
    config.update(options)
    try:  # every option is checked here, before the run folder exists
        single = detector_class(arch)(**config).check_options()
    except (TypeError, InputError) as e:
        raise InputError(f"--param: {e}") from None
    if args.members == 1:
        return single
    if args.resume:
        raise InputError("--resume: an ensemble (--members > 1) cannot resume; train it again")
    return detector_class("ensemble")(detector=arch, config=config, members=args.members)


def _float(v, flag):
    try:
        value = float(v)
    except ValueError:
        raise InputError(f"{flag} must be a number or 'auto', got '{v}'") from None
    return check_range(value, flag, 0, low_open=True)


def check_args(args) -> None:
    """Every numeric flag's range, before anything is built or written."""
    check_data_args(args)
    check_range(args.batch_size, "-b/--batch-size", 1)
    check_range(args.epochs, "--epochs", 1)
    check_range(args.size, "--size", 8)
    check_range(args.patience, "--patience", 0)
    check_range(args.rotation, "--rotation", 0, 180)
    check_range(args.members, "--members", 1)
    from ..distribute import resolve

    resolve(args.strategy, n_gpus=0, tf_config="")  # the name only; devices are looked at later
    if args.lr != "auto":
        _float(args.lr, "--lr")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from ..data import Augmentation, Preprocessing, make_dataset, split_validation

    arch = _canonical_arch(args.architecture)
    check_args(args)
    apply_smoke_caps(args)
    from .. import distribute

    strategy, strategy_name = distribute.make_strategy(args.strategy)
    distribute.check_global_batch(args.batch_size, strategy)
    if args.members < 1 or (args.members > 1 and arch in AE_ARCHITECTURES):
        raise InputError(f"--members must be 1 for autoencoders and at least 1 for GANs, got {args.members}")
    size = args.size or (256 if arch in AE_ARCHITECTURES else 64)
    prep = Preprocessing(size=size, color_mode=args.color)
    detector = make_detector(args, prep)  # validates flags before any file is written
    cat = resolve_category(args.data, args.abnormal, args.masks, args.seed)
    train_s, val_s = split_validation(cat.train, args.val_fraction, args.seed)
    if not args.quiet:
        print_run_header(cat, f"training on {len(train_s)} images, validating on {len(val_s)}; {arch}, "
                         f"{prep.input_shape}", strategy, strategy_name)
    if not 0 <= args.rotation <= 180:
        raise InputError(f"--rotation must be between 0 and 180 degrees, got {args.rotation}")
    augment = None if args.no_augment else Augmentation(
        rotation_deg=args.rotation, flip_horizontal=args.flip, flip_vertical=args.flip)
    # Under several replicas a last batch with fewer images than replicas is dropped (a replica without
    # images fails); its images are in other epochs' batches (training) or left out (validation).
    train_ds = make_dataset(train_s, prep, args.batch_size, shuffle=True, seed=args.seed, augment=augment, cache=True,
                            drop_remainder=distribute.short_last_batch(len(train_s), args.batch_size, strategy))
    val_ds = make_dataset(val_s, prep, args.batch_size, cache=True,
                          drop_remainder=distribute.short_last_batch(len(val_s), args.batch_size, strategy)
                          ) if len(val_s) >= distribute.replicas(strategy) else None

    loss_tag = args.loss if arch in AE_ARCHITECTURES else "gan"
    out = args.out or os.path.join(
        "runs", cat.name, f"{arch}-{loss_tag}-{args.color}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if os.path.isdir(out) and os.listdir(out) and not args.resume:
        if os.path.exists(os.path.join(out, "info.json")):
            raise InputError(f"--out: {out} already holds a trained model; choose another folder or pass --resume")
    from ..multiworker import is_chief

    if not is_chief(strategy):
        _train_as_worker(detector, arch, train_ds, val_ds, out, args, strategy)
        return
    with output_dir(out, keep_existing=args.resume):
        t0 = time.time()
        _fit(detector, arch, train_ds, val_ds, out, args, strategy)
        wall = time.time() - t0
        detector.save(out)
        info = {
            "version": 1,
            "detector": detector.name,
            "architecture": arch,
            "loss": args.loss if arch in AE_ARCHITECTURES else None,
            "data": data_info(cat, args, val_s),
            "preprocessing": prep.to_dict(),
            "augmentation": augment.to_dict() if augment else None,
            "training": {
                "epochs_max": args.epochs,
                "epochs_trained": getattr(detector, "epochs_trained_", None),
                # GANs keep the last epoch or, with --param selection=best_val, the best on validation normals
                "selected_epoch": getattr(detector, "selected_epoch_", None),
                "batch_size": args.batch_size,
                "learning_rate": getattr(detector, "learning_rate_", None),
                "lr_setting": args.lr,
                "seed": args.seed,
                "strategy": strategy_name,
                "replicas": distribute.replicas(strategy),
                "wall_seconds": round(wall, 2),
                # epochs run by this call (a resumed run counts only its own)
                "images_per_second": round(
                    len(next(iter(detector.history_.values()), [])) * len(train_s) / max(wall, 1e-9), 2
                ),
            },
        }
        write_json(os.path.join(out, "info.json"), info)
        _reports(detector, out, val_ds, cat, prep, args)
    if not args.quiet:
        print(f"model saved to {os.path.join(out, 'model.keras') if arch in AE_ARCHITECTURES else out}")
        print(f"trained {info['training']['epochs_trained']} epochs in {wall:.1f} s "
              f"({info['training']['images_per_second']} img/s)")


def _fit(detector, arch, train_ds, val_ds, workdir, args, strategy) -> None:
    """Train under ``strategy``: models and optimisers are built inside its scope."""
    verbose = 0 if args.quiet else 1
    with strategy.scope():
        if arch in AE_ARCHITECTURES:
            detector.fit(train_ds, val_ds, workdir=workdir, resume=args.resume, verbose=verbose)
            return
        # GANs: same checkpoint / resume / logs, no early stopping on adversarial losses.
        from ..training import fresh_workdir, standard_callbacks

        fresh_workdir(workdir, args.resume)
        # An ensemble's members would share one checkpoint and backup: they get only the NaN guard.
        callbacks, guard = standard_callbacks(workdir if args.members == 1 else None, monitor=None)
        detector.fit(train_ds, val_ds, callbacks=callbacks, verbose=verbose)
        guard.check()


def _train_as_worker(detector, arch, train_ds, val_ds, out, args, strategy) -> None:
    """A non-chief worker of ``--strategy multiworker`` trains in step with the chief but writes
    nothing of the run: its checkpoints go to a folder of its own, removed at the end. With
    ``--resume`` it starts from the chief's backup, so every worker resumes at the same epoch."""
    from ..multiworker import worker_workdir

    with worker_workdir(out, args.resume) as workdir:
        _fit(detector, arch, train_ds, val_ds, workdir, args, strategy)
    if not args.quiet:
        print(f"trained {getattr(detector, 'epochs_trained_', '?')} epochs as a worker; the chief writes {out}")


def _reports(detector, out, val_ds, cat, prep, args):
    from .. import reports
    from ..data import make_dataset

    history = getattr(detector, "history_", None)
    if history:
        reports.plot_history(history, out)
    lr_test = getattr(detector, "lr_test_", None)
    if lr_test:
        reports.plot_lr_range_test(lr_test["lrs"], lr_test["losses"], os.path.join(out, "lr_range_test.png"),
                                   lr_test["suggested_lr"])
    if args.inspect and hasattr(detector, "reconstruct"):
        import numpy as np

        sets = [("validation", val_ds)]
        if cat.test:
            sets.append(("test", make_dataset(cat.test, prep, args.batch_size)))
        for name, ds in sets:
            if ds is None:
                continue
            imgs, recs, maps, names = [], [], [], []
            for batch in ds:
                x = batch["image"]
                r = detector.reconstruct(x)
                imgs.append(np.asarray(x))
                recs.append(np.asarray(r))
                maps.append(np.asarray(detector.residual_maps(x, r)))
                names += [f"{t.decode()}_{os.path.splitext(os.path.basename(p.decode()))[0]}"
                          for t, p in zip(batch["defect_type"].numpy(), batch["path"].numpy())]
            reports.plot_inspection(np.concatenate(imgs), np.concatenate(recs), np.concatenate(maps),
                                    os.path.join(out, "inspection", name), names)


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
