import sys

from istio.mixer.main import main

sys.exit(main())
