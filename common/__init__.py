"""Code the Fanout processes share: settings, messages, brokers, logging."""
