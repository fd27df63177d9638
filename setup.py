"""Builds the Cython fast paths; everything else is in pyproject.toml."""
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
PYX = sorted(str(p.relative_to(HERE)) for p in HERE.glob("*/_*.pyx"))

extensions = [
    Extension(p[:-4].replace("/", "."), [p], extra_compile_args=["-O3"]) for p in PYX
]

setup(ext_modules=cythonize(extensions, language_level=3, quiet=True))
