"""pgfence benchmarks: start-up, imports, failover, self-fence, footprint, contention.

Run with `scripts/bench` (or `.venv/bin/python -m bench` from the repository root, as
root); never part of the test suite. The test harness in tests/harness (sandboxes, real
PostgreSQL, etcd clusters, process registry) is reused, not copied.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
