"""``python -m diffcore ...`` (and ``torchrun --nproc-per-node N -m diffcore generate ...``)."""
import sys

from .cli import main

sys.exit(main())
