"""``python3 -m dist_train.gpucheck``: see :mod:`dist_train.gpucheck`."""
import sys

from .runner import main

sys.exit(main())
