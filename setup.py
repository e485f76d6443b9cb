"""Declares the optional C extension; everything else lives in pyproject.toml."""

import platform

from setuptools import Extension, setup

# No -ffast-math: the kernel's error-free transformations need every operation rounded as
# written, and contraction into FMA would change the plain fp32 formula.
_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # Generic tuning would keep the AVX-512 clone at 256-bit vectors.
    _FLAGS.append("-mprefer-vector-width=512")

setup(
    ext_modules=[
        Extension(
            "app.residuals._native",
            ["app/residuals/_native.c"],
            extra_compile_args=_FLAGS,
            optional=True,
        )
    ]
)
