"""What every edge of the server shares (gRPC, the dashboard, metrics, the proxy): the
xproxy keys of a call read as its context, and the protections of an HTTP listener."""
