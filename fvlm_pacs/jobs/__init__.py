"""The durable job queue (leases, retries with backoff, dead-letter) and the worker loop."""
