"""The model organism: a tiny VLM trained from scratch on a grid-reasoning task (described in data/README.md).

- :mod:`vpstudy.organism.tasks`: the task generator (scenes, questions, traces, per-token cells);
- :mod:`vpstudy.organism.model`: the architecture of each organism family, built from config;
- :mod:`vpstudy.organism.train`: ``vpstudy train-organism``;
- :mod:`vpstudy.organism.shipped`: where the shipped organisms and evaluation set live in ``data/``.
"""
