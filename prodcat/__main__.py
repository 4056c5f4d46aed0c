import sys

from prodcat.cli import main

sys.exit(main())
