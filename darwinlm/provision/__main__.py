"""``python -m darwinlm.provision [model|text|all] [--cache-dir DIR] [--debian-docs] [--force]``."""

import sys

from darwinlm.provision import main

sys.exit(main())
