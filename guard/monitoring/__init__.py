"""The monitor: runs the policy's detectors over the observations of answered requests, off the
request path, and raises the sanctions of clients they alarm on; ``monitor`` in process (behind a
bounded queue), ``stream`` as ``guard monitor`` processes over Redis Streams."""
