import sys

from deformable_detr.cli import main

sys.exit(main())
