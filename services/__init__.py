"""One module per Fanout process: the four ingresses, the broker runner and
the supervisor launcher."""
