"""The toolkit of the tests, `make demo`, the failover playbook and the benchmark.

services   throwaway Redis and Postgres servers, reachability, URL helpers
certificates  a test CA, a server certificate it signs, an unrelated CA (TLS tests); TLS URLs
processes  the processor command (PROCESSOR), children of a pid, CPU ticks, RSS, titles
fleet      the deterministic simulated fleet (Fleet, the fix format)
poison     malformed stream entries (malformed, MALFORMED_KINDS)
writer     writing to the stream: produce, backlog, steady, Counts
progress   the simulator's progress line
harness    what the demo and the failover playbook share: servers for a run, a producer
           thread, the group's state, stopping a processor, deleting keys
"""
