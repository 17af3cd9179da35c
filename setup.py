"""Build script. The compiled extension `distilpose_kernels._C` is added by the extension issue."""
from setuptools import setup

setup()
