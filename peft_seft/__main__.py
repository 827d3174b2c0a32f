"""``python -m peft_seft``: the ``seft`` command line."""

import sys

from .cli import main

sys.exit(main())
