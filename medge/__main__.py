import sys

from medge.cli import main

sys.exit(main())
