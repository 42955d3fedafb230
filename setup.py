"""Build hook: compiles the plain-C CPU kernels (see src/bitnet158/kernels/cpu/) when present."""
from setuptools import setup

setup()
