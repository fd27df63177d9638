"""Builds the Cython fast paths; everything else is in pyproject.toml."""
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
PACKAGES = ("nicemu", "driver", "kstack")
PYX = sorted(str(p.relative_to(HERE)) for pkg in PACKAGES for p in (HERE / pkg).rglob("_*.pyx"))

extensions = [
    Extension(p[:-4].replace("/", "."), [p], extra_compile_args=["-O3"]) for p in PYX
]

setup(ext_modules=cythonize(extensions, language_level=3, quiet=True))
