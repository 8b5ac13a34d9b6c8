"""One line naming the machine a benchmark ran on, printed in every benchmark's header.

CPU timings do not transfer between x86 CPUs: the same train step measured 0.69x torch's time on a 2-core AMD
Zen 5 and 1.33-1.40x on a 2-core Intel Xeon (docs/benchmarks.md). The matmul libraries pick their kernels by
vendor and ISA (torch's MKL uses AVX-512 only on Intel CPUs; XLA's YNNPACK uses it on both), so a figure
without the CPU model and its vector extensions cannot be compared with another.
"""

import os
import platform

# /proc/cpuinfo flags that decide which matmul kernels run, in the order printed.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu() -> str:
    """CPU model, family/model numbers, count and the ISA_FLAGS it has, from /proc/cpuinfo (Linux)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"
    return (f"{fields.get('model name', '?')} (vendor {fields.get('vendor_id', '?')}, family "
            f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}), {os.cpu_count()} CPUs, {isa}")


def load() -> str:
    """The 1/5/15-min load averages as `a/b/c`: above the core count, other processes share the cores and skew
    CPU timings, so benchmarks print it before and after what they time."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def describe() -> str:
    """The CPU plus, where loaded, the versions and kernels of jax and torch."""
    parts = [cpu()]
    try:
        import jax

        parts.append(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    except ImportError:
        pass
    try:
        import torch

        mkl = torch.backends.mkl.is_available()
        parts.append(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels, "
                     f"{'MKL' if mkl else 'no MKL'} BLAS, fp32 matmul precision "
                     f"{torch.get_float32_matmul_precision()}, {torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return " | ".join(parts)


if __name__ == "__main__":
    print(describe())
