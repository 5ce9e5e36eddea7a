"""Docker HEALTHCHECK: exit 0 when GET /readyz answers 200, else 1. Python only: no curl in the image."""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("EXITSERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as e:
    print(f"not ready: {e}", file=sys.stderr)
    sys.exit(1)
