"""What runs next to HAProxy, inside the agent: the lease module (SPOE handler),
the segment tracker, the kernel sampler, the publisher and their metrics."""
