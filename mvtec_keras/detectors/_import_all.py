"""Import every built-in detector module so that they register themselves."""

import importlib

for _mod in ("autoencoder", "mahalanobis", "spade", "padim", "patchcore", "gan", "ensemble"):
    try:
        importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as e:  # a family not built yet
        if e.name != f"{__package__}.{_mod}":
            raise
