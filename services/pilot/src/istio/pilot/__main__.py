import sys

from istio.pilot.main import main

sys.exit(main())
