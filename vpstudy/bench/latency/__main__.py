"""``python -m vpstudy.bench.latency``: the latency benchmark (see :mod:`vpstudy.bench.latency`)."""

from vpstudy.bench.latency.cli import main

main()
