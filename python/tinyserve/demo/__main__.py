"""python -m tinyserve.demo: the same as python -m tinyserve demo."""

import sys

from .cli import main

sys.exit(main())
