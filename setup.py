"""Package list for setuptools; everything else is in pyproject.toml.

The packages are ``vpstudy`` and every subpackage found under ``vpstudy/`` (so that a new one is
never left out of the wheel), plus ``vpstudy.kernels``, whose sources live in ``kernels/`` at the
repository root (``[tool.setuptools.package-dir]`` in pyproject.toml). pyproject.toml alone cannot
say this: ``[tool.setuptools.packages.find]`` only finds packages in their own directories, and it
cannot be combined with an explicit list.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["vpstudy", "vpstudy.*"]), "vpstudy.kernels"])
