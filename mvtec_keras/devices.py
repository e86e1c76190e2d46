"""Which devices TensorFlow runs on, and the fastest numerically safe precision for them."""

from __future__ import annotations

from typing import Optional, Sequence

#: precisions a model can be trained in (Keras dtype policies)
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def gpu_details() -> list:
    """``[(name, (major, minor) or None), ...]`` for each visible GPU."""
    import tensorflow as tf

    out = []
    for dev in tf.config.list_physical_devices("GPU"):
        try:
            d = tf.config.experimental.get_device_details(dev)
        except Exception:  # details are optional; the device is still usable
            d = {}
        out.append((d.get("device_name", dev.name), d.get("compute_capability")))
    return out


def cpu_has_bfloat16(cpuinfo: Optional[str] = None) -> bool:
    """Native bfloat16 on this CPU (AVX512-BF16 or AMX); emulated bfloat16 is slower than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    return "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo


def auto_precision(gpus: Optional[Sequence] = None, cpu_bf16: Optional[bool] = None) -> str:
    """``mixed_float16`` on GPUs that all have compute capability >= 7.0 (tensor cores),
    ``mixed_bfloat16`` on a CPU with native bfloat16, ``float32`` otherwise."""
    gpus = gpu_details() if gpus is None else list(gpus)
    if gpus:
        caps = [cc for _, cc in gpus]
        if all(cc is not None and tuple(cc) >= (7, 0) for cc in caps):
            return "mixed_float16"
        return "float32"
    return "mixed_bfloat16" if (cpu_has_bfloat16() if cpu_bf16 is None else cpu_bf16) else "float32"


def describe(gpus: Optional[Sequence] = None) -> str:
    """One line naming the devices work will run on."""
    gpus = gpu_details() if gpus is None else list(gpus)
    if not gpus:
        import os

        return f"devices: CPU ({os.cpu_count()} cores), no GPU visible"
    parts = [f"GPU:{i} {name}" + (f" (compute capability {cc[0]}.{cc[1]})" if cc else "")
             for i, (name, cc) in enumerate(gpus)]
    return "devices: " + ", ".join(parts)
