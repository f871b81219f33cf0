"""Wait (at most 10 s) until the router on 127.0.0.1:PORT reports every replica healthy."""

import json
import sys
import time
import urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/status"
for _ in range(100):
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            if all(r["status"] == "healthy" for r in json.load(response)["replicas"]):
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
print(f"the router at {url} never saw its replicas healthy", file=sys.stderr)
sys.exit(1)
