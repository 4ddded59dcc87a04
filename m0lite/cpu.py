"""What this CPU can do, as one fact: its feature flags, less those masked with M0LITE_CPU_ISA.

Everything in m0lite that depends on the CPU (the default dtype, whether bf16 weights are packed for
oneDNN, the int8 unit and code width) asks `flags()` or `native_bf16()`, never /proc/cpuinfo itself.
`M0LITE_CPU_ISA` makes a richer CPU behave as a poorer one, so that tests and benchmarks check every kind
of CPU m0lite's users have on whatever machine they run:

  M0LITE_CPU_ISA=avx2    as an AVX2-only CPU (most rented AMD EPYC and older Intel): no AVX-512, no VNNI,
                         no native bf16, no AMX
  M0LITE_CPU_ISA=avx512  as AVX-512 before Cooper Lake (Skylake-SP): no VNNI, no native bf16, no AMX

Masking the flags alone would only change m0lite's choices, not the arithmetic under them, so the same
variable caps oneDNN, MKL and torch's own vectorised kernels (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
ATEN_CPU_CAPABILITY: softmax, exp, the flash attention kernel, every elementwise pass) unless those are set
already. Each library reads its variable at its first use: m0lite/__init__.py imports this module before
torch, and a subprocess inherits the variables.
"""

from __future__ import annotations

import functools
import os

# Per level: the flag prefixes it drops, the caps it sets for oneDNN, MKL and ATen, and its vector width in bits.
LEVELS = {
    "avx2": (("avx512", "amx", "avx_vnni"), "AVX2", "AVX2", "avx2", 256),
    "avx512": (("avx512_bf16", "avx512_vnni", "avx512_fp16", "amx", "avx_vnni"), "AVX512_CORE", "AVX512", "avx512", 512),
}
CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")  # in LEVELS' order
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # bf16 matmuls in hardware; without them torch emulates bf16


def level() -> str | None:
    """The masked level (a key of LEVELS), or None when the CPU is taken as it is."""
    value = os.environ.get("M0LITE_CPU_ISA", "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in LEVELS:
        raise ValueError(f"M0LITE_CPU_ISA must be one of {', '.join(LEVELS)} or native, got {value!r}")
    return value


def _cap_libraries() -> None:
    if (name := level()) is not None:
        for variable, cap in zip(CAPS, LEVELS[name][1:4]):
            os.environ.setdefault(variable, cap)


_cap_libraries()


@functools.cache
def flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo names; empty elsewhere), less the masked ones."""
    try:
        found = frozenset(open("/proc/cpuinfo").read().split())
    except OSError:
        return frozenset()
    name = level()
    return found if name is None else frozenset(f for f in found if not f.startswith(LEVELS[name][0]))


def vector_bits() -> int | None:
    """The masked level's vector width, for code generated at run time (torch.compile's C++), or None unmasked.
    Inductor left to pick its own under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU made wrong code (torch
    2.13: a compiled RMSNorm feeding a linear gave NaN); told the width, it is right."""
    name = level()
    return None if name is None else LEVELS[name][4]


def native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls then run several times faster than fp32 (without, far slower)."""
    return bool(flags() & set(NATIVE_BF16))


def describe() -> str:
    """The CPU as benchmarks and logs name it: model, and any mask or library cap in force."""
    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    caps = [f"{k}={os.environ[k]}" for k in ("M0LITE_CPU_ISA", *CAPS) if os.environ.get(k)]
    return model + (f" [{', '.join(caps)}]" if caps else "")
