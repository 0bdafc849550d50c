import sys

from amodal3d.cli import main

sys.exit(main())
