import sys

from istio.istioctl.main import main

sys.exit(main())
