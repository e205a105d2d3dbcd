import sys

from pgfence.cli import main

sys.exit(main())
