"""`pgfence verify-fs`: does a shared filesystem give pgfence what it relies on?

- `command`: the command line, the session of hosts taking part, the report;
- `probe`: the probes (exclusive create, rename atomicity, visibility, durability);
- `verdict`: judging the probes' findings (PASS, FAIL, INCONCLUSIVE) and the exit codes.
"""
