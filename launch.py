#!/usr/bin/env python
"""Train and evaluate AlexNet: `python launch.py EXPERIMENT.py[:ARG] [--config.KEY=VALUE ...]`.

Everything happens in `alexnet_jax.cli`; this file stays a thin entry point.
"""

import sys

from alexnet_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
