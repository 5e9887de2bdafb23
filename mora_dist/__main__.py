import sys

from mora_dist.cli import main

sys.exit(main())
