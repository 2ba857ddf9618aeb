"""``python -m vpstudy``: the command line (what ``torchrun ... -m vpstudy`` and
``accelerate launch ... -m vpstudy`` start in every process)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
